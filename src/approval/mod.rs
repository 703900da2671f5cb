//! Network approvals and egress grants: `[NETWORK_REQUEST: domain]` → a card → a grant → the
//! firewall alias, and back out of the alias when no grant covers the domain any more.
//!
//! A **grant** is a domain given to one session: who asked (the agent of that session, hence
//! its owner), who decided, when, and until when ([`GrantScope::Ttl`]: `SM_EGRESS_GRANT_TTL_SECS`
//! from the decision; [`GrantScope::Session`]: until the session ends). Everything lives in
//! storage, so a bot restart loses nothing.
//!
//! 1. A marker from an agent ([`Approvals::on_marker`]):
//!    - the domain is normalised and validated ([`crate::firewall::domain`]), then checked
//!      against the policy ([`crate::firewall::policy`]: `SM_DENIED_DOMAINS`, names resolving
//!      only inside); a refused one is answered `[NETWORK_DENIED: d] <why>` with no card;
//!    - a domain a live grant already covers (this session's, or another live session's) is
//!      checked against what the alias holds **now** (OPNsense `getItem`): present → answered
//!      `[NETWORK_APPROVED: d]` (another session's grant is shared: a grant of this session's
//!      own is recorded with the same expiry, or until this session ends when the source was
//!      "for this session"; a notice is posted and audited); absent (drift) → a request
//!      the bot decides itself puts it back, and the agent is told once it is back;
//!    - otherwise a pending request is opened (one per session and domain; at most
//!      `SM_MAX_PENDING_APPROVALS` per session, beyond which the agent is denied) and a card
//!      with **Approve for N h**, **Approve for this session** and **Deny** is posted, each
//!      button signed ([`signing`]).
//! 2. A click (a [`CardClick`] the chat adapter parsed, [`CardClickHandler::on_click`]):
//!    signature verified in constant time, expiry checked, the request still open (not closed
//!    by its session's end), the clicker allowed (`SM_ALLOWED_APPROVERS`, or the session's
//!    owner and the admins; with `SM_APPROVAL_SEPARATE_APPROVER` the owner may not approve),
//!    then decided atomically in storage: the first decision wins. The answer replaces the
//!    card's buttons at once; the firewall work happens in the background.
//! 3. The worker ([`Approvals::run_workers`]), every few seconds or when woken: expires
//!    unanswered requests, closes those of ended sessions (their cards say so), ends grants
//!    that expired or whose session ended, applies approved requests to the alias (recording
//!    the grant, confirming with `getItem` before telling the agent), and removes from the
//!    alias the domains the bot added that no live grant covers. All firewall changes are
//!    serialised (in this process, and across instances through a lease in storage),
//!    retried with backoff, and resumed after a restart. Entries the bot did not add are never
//!    removed.
//! 4. Every request, decision, grant, end and firewall change goes to the audit log.

pub mod signing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};

use async_trait::async_trait;
use secrecy::SecretString;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::agent::markers::Marker;
use crate::chat::{
    ActionCard, CardClick, CardClickHandler, ChatOutbound, ClickError, ClickReply, PostRef,
};
use crate::firewall::domain::parse_domain;
use crate::firewall::policy::EgressPolicy;
use crate::session::{short_id, MarkerHandler, SessionRuntime};
use crate::store::{
    now_ms, ApprovalRequest, ApprovalState, AuditEntry, DecideOutcome, Decision, Grant, GrantEnd,
    GrantScope, LockOutcome, NewGrant, Session, Store, StoreError, StoreResult,
};
use crate::telemetry::names;

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
    /// Makes sure `domain` is in the approved-domains alias and applied. Returns whether this
    /// call added it (`false`: it was there already, e.g. the operator's own entry).
    ///
    /// # Errors
    /// [`ApplyError`].
    async fn add(&self, domain: &str) -> Result<bool, ApplyError>;

    /// Makes sure `domain` is not in the alias, and applies that. Returns whether it was there.
    ///
    /// # Errors
    /// [`ApplyError`].
    async fn remove(&self, domain: &str) -> Result<bool, ApplyError>;

    /// Whether the alias holds `domain` now (read from the firewall, not remembered).
    ///
    /// # Errors
    /// [`ApplyError`].
    async fn contains(&self, domain: &str) -> Result<bool, ApplyError>;
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

fn apply_error(e: &crate::firewall::opnsense::FirewallError) -> ApplyError {
    ApplyError {
        permanent: e.is_permanent(),
        message: e.to_string(),
    }
}

#[async_trait]
impl AliasWriter for crate::firewall::opnsense::OpnsenseClient {
    async fn add(&self, domain: &str) -> Result<bool, ApplyError> {
        self.ensure_domains(&[domain.to_owned()])
            .await
            .map(|added| !added.is_empty())
            .map_err(|e| apply_error(&e))
    }

    async fn remove(&self, domain: &str) -> Result<bool, ApplyError> {
        self.remove_domains(&[domain.to_owned()])
            .await
            .map(|removed| !removed.is_empty())
            .map_err(|e| apply_error(&e))
    }

    async fn contains(&self, domain: &str) -> Result<bool, ApplyError> {
        crate::firewall::opnsense::OpnsenseClient::contains(self, domain)
            .await
            .map_err(|e| apply_error(&e))
    }
}

/// The [`AliasWriter`] when no firewall is configured (`SM_OPNSENSE_URL` unset): decisions are
/// still asked for, recorded and told to the agent, but nothing enforces them. It remembers
/// what was approved in this process, so the flow behaves as with a firewall.
#[derive(Debug, Default)]
pub struct Unenforced {
    domains: std::sync::Mutex<HashSet<String>>,
}

#[async_trait]
impl AliasWriter for Unenforced {
    async fn add(&self, domain: &str) -> Result<bool, ApplyError> {
        Ok(self
            .domains
            .lock()
            .map(|mut d| d.insert(domain.to_owned()))
            .unwrap_or(false))
    }

    async fn remove(&self, domain: &str) -> Result<bool, ApplyError> {
        Ok(self
            .domains
            .lock()
            .map(|mut d| d.remove(domain))
            .unwrap_or(false))
    }

    async fn contains(&self, domain: &str) -> Result<bool, ApplyError> {
        Ok(self
            .domains
            .lock()
            .map(|d| d.contains(domain))
            .unwrap_or(false))
    }
}

/// An [`AliasWriter`] whose writes (`add`, `remove`) first wait until this instance is
/// active ([`crate::leader::Gate`]) and fail, not permanently, on a standby; `contains` only
/// reads and does not wait.
pub struct GatedAliasWriter {
    inner: Arc<dyn AliasWriter>,
    gate: crate::leader::Gate,
}

impl GatedAliasWriter {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn AliasWriter>, gate: crate::leader::Gate) -> Self {
        Self { inner, gate }
    }

    async fn acting(&self) -> Result<(), ApplyError> {
        self.gate.opened().await.map_err(|e| ApplyError {
            message: e.to_string(),
            permanent: false,
        })
    }
}

#[async_trait]
impl AliasWriter for GatedAliasWriter {
    async fn add(&self, domain: &str) -> Result<bool, ApplyError> {
        self.acting().await?;
        self.inner.add(domain).await
    }

    async fn remove(&self, domain: &str) -> Result<bool, ApplyError> {
        self.acting().await?;
        self.inner.remove(domain).await
    }

    async fn contains(&self, domain: &str) -> Result<bool, ApplyError> {
        self.inner.contains(domain).await
    }
}

/// Who may decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approvers {
    /// The owner of the session that asked, and the admins (`SM_ALLOWED_APPROVERS` unset).
    OwnerAndAdmins,
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
    /// `SM_ADMIN_USERS`, resolved: approvers when [`Approvers::OwnerAndAdmins`].
    pub admins: HashSet<String>,
    /// `SM_EGRESS_GRANT_TTL_SECS`: how long an "Approve for N h" grant lasts.
    pub grant_ttl: Duration,
    /// `SM_APPROVAL_SEPARATE_APPROVER`: a session's owner may not approve its requests.
    pub separate_approver: bool,
    /// `SM_MAX_PENDING_APPROVALS`: open cards per session.
    pub max_pending: u32,
    /// Domains refused before any card.
    pub policy: Arc<EgressPolicy>,
}

impl ApprovalConfig {
    /// Settings for tests and small setups: approvals by the owner and admins, 8 h grants, no
    /// two-person rule, 5 open cards per session, a policy that refuses nothing.
    pub fn new(
        callback_url: String,
        secret: SecretString,
        ttl: Duration,
        approvers: Approvers,
        alias: String,
    ) -> Self {
        Self {
            callback_url,
            secret,
            ttl,
            approvers,
            alias,
            lease: Duration::from_secs(300),
            admins: HashSet::new(),
            grant_ttl: Duration::from_secs(8 * 3600),
            separate_approver: false,
            max_pending: 5,
            policy: Arc::new(EgressPolicy::allow_all()),
        }
    }
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
    /// Worker rounds completed.
    rounds: std::sync::atomic::AtomicU64,
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
            rounds: std::sync::atomic::AtomicU64::new(0),
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

    /// The card of a request: with buttons while it waits (`status` `None`), or with the
    /// outcome in place of the buttons.
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
                let for_ttl = format!("Approve for {}", span(self.config.grant_ttl));
                let actions = [
                    (ACTION_APPROVE_TTL, for_ttl.as_str(), "good"),
                    (
                        ACTION_APPROVE_SESSION,
                        "Approve for this session",
                        "primary",
                    ),
                    (ACTION_DENY, "Deny", "danger"),
                ]
                .into_iter()
                .map(|(action, label, style)| {
                    signing::signed_action(
                        &self.config.secret,
                        CARD_KIND,
                        &request.id,
                        action,
                        request.expires_at,
                        label.to_owned(),
                        style,
                    )
                })
                .collect();
                let owner = session.map_or_else(String::new, |s| {
                    format!(", started by user id `{}`", s.started_by)
                });
                (
                    format!(
                        "Claude in {asker}{owner} asks to reach **{}**.\nApproving adds it to the firewall alias `{}` for this session: for {} or until the session ends.",
                        request.domain,
                        self.config.alias,
                        span(self.config.grant_ttl)
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

    /// Posts `text` in the session's thread (best effort).
    async fn notice(&self, session_id: &str, text: &str) {
        if let Ok(Some(s)) = self.store.session(session_id).await {
            if let Err(e) = self
                .chat
                .post(&s.channel_id, Some(&s.thread_id), text)
                .await
            {
                warn!(error = %e, "cannot post an egress notice");
            }
        }
    }

    /// Whether `user_id` may decide requests of `session`: `SM_ALLOWED_APPROVERS`, or the
    /// session's owner and the admins.
    fn may_decide(&self, user_id: &str, session: &Session) -> bool {
        match &self.config.approvers {
            Approvers::Only(ids) => ids.contains(user_id),
            Approvers::OwnerAndAdmins => {
                session.started_by == user_id || self.config.admins.contains(user_id)
            }
        }
    }

    /// Decides a click (see the module documentation for the order of checks).
    async fn decide(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        let (request_id, action, expires) = signing::verified_click(
            &self.config.secret,
            &click.context,
        )
        .inspect_err(|e| {
            if matches!(e, ClickError::Forbidden) {
                let request = click.context.get("request_id").and_then(|r| r.as_str());
                warn!(request, user = %click.user_id, "refused a callback with a bad signature");
            }
        })?;
        let (decision, scope) = match action {
            ACTION_APPROVE_TTL => (Decision::Approve, GrantScope::Ttl),
            ACTION_APPROVE_SESSION => (Decision::Approve, GrantScope::Session),
            ACTION_DENY => (Decision::Deny, GrantScope::Ttl),
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
        let unavailable = |e: StoreError| {
            error!(error = %e, request = request_id, "cannot read a request");
            ClickError::Unavailable
        };
        let request = self
            .store
            .approval(request_id)
            .await
            .map_err(unavailable)?
            .ok_or(ClickError::NotFound)?;
        if request.state == ApprovalState::Closed {
            return Ok(ClickReply::Notice(
                "This request was closed: its session has ended.".into(),
            ));
        }
        let session = self
            .store
            .session(&request.session_id)
            .await
            .map_err(unavailable)?
            .ok_or(ClickError::NotFound)?;
        let refusal = if !self.may_decide(&click.user_id, &session) {
            Some(match &self.config.approvers {
                Approvers::Only(_) => "You are not allowed to approve or deny network access: only the users in SM_ALLOWED_APPROVERS may.".to_owned(),
                Approvers::OwnerAndAdmins => "You are not allowed to approve or deny network access for this session: only its owner and the admins may.".to_owned(),
            })
        } else if self.config.separate_approver
            && decision == Decision::Approve
            && click.user_id == session.started_by
        {
            Some("Two-person rule (SM_APPROVAL_SEPARATE_APPROVER): the owner of a session may not approve its own network requests; ask an approver. You may still deny it.".to_owned())
        } else {
            None
        };
        if let Some(text) = refusal {
            self.audit(
                &request,
                Some(&session.thread_id),
                "refused_approver",
                Some((&click.user_id, &click.user_name)),
                "rejected",
                None,
            )
            .await;
            return Ok(ClickReply::Notice(text));
        }
        let outcome = self
            .store
            .decide_approval(
                request_id,
                decision,
                scope,
                &click.user_id,
                &click.user_name,
                now,
            )
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
                if request.state == ApprovalState::Closed {
                    return Ok(ClickReply::Notice(
                        "This request was closed: its session has ended.".into(),
                    ));
                }
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
                    Some(&session.thread_id),
                    verb,
                    Some((&click.user_id, &click.user_name)),
                    "ok",
                    Some(format!("scope {scope}")).filter(|_| decision == Decision::Approve),
                )
                .await;
                let status = match decision {
                    Decision::Approve => format!(
                        "⏳ Approving {} {}… (by @{})",
                        request.domain,
                        self.scope_text(scope, now),
                        click.user_name
                    ),
                    Decision::Deny => {
                        counter!(names::EGRESS_GRANTS_TOTAL, "event" => "denied").increment(1);
                        format!("🚫 Denied by @{} at {}", click.user_name, clock(now))
                    }
                };
                let card = self.card(&request, Some(&session), Some(status));
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

    /// "for 8 h (until 14:00 UTC)" or "for this session".
    fn scope_text(&self, scope: GrantScope, from: i64) -> String {
        match scope {
            GrantScope::Ttl => format!(
                "for {} (until {})",
                span(self.config.grant_ttl),
                clock(from + millis(self.config.grant_ttl))
            ),
            GrantScope::Session => "for this session".into(),
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

    /// Applies due approvals, ends grants and removes uncovered domains until `cancel` fires,
    /// then waits for the background work clicks started.
    pub async fn run_workers(&self, cancel: CancellationToken) {
        self.work(cancel).await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// One round of the worker's duties (see the module documentation, step 3).
    async fn round(&self) {
        let now = now_ms();
        match self.store.expire_approvals(now).await {
            Ok(expired) => {
                for request in expired {
                    self.after_expiry(&request).await;
                }
            }
            Err(e) => warn!(error = %e, "cannot expire requests"),
        }
        match self.store.close_approvals_of_ended_sessions(now).await {
            Ok(closed) => {
                for request in closed {
                    self.audit(
                        &request,
                        None,
                        "closed",
                        None,
                        "ok",
                        Some("the session ended".into()),
                    )
                    .await;
                    self.update_card(
                        &request,
                        format!("🔒 Closed at {}: the session ended", clock(now)),
                    )
                    .await;
                }
            }
            Err(e) => warn!(error = %e, "cannot close the requests of ended sessions"),
        }
        match self.store.end_due_grants(now).await {
            Ok(ended) => {
                for grant in ended {
                    self.after_grant_end(&grant).await;
                }
            }
            Err(e) => warn!(error = %e, "cannot end due grants"),
        }
        match self.store.approvals_due_for_firewall(now_ms()).await {
            Ok(due) => {
                for request in due {
                    self.apply(request).await;
                }
            }
            Err(e) => warn!(error = %e, "cannot list approvals to apply"),
        }
        match self.store.firewall_domains_to_remove(now_ms(), None).await {
            Ok(domains) => {
                for domain in domains {
                    self.remove(&domain).await;
                }
            }
            Err(e) => warn!(error = %e, "cannot list domains to remove from the alias"),
        }
        if let Ok(live) = self.store.live_grants(None, now_ms()).await {
            #[allow(clippy::cast_precision_loss)]
            gauge!(names::EGRESS_GRANTS_ACTIVE).set(live.len() as f64);
        }
        self.rounds
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many worker rounds (expire, close, end grants, apply, remove) have completed: a
    /// round that starts after an event has seen it, so a check that something did *not*
    /// happen can wait for two more rounds instead of a fixed time.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn work(&self, cancel: CancellationToken) {
        loop {
            self.round().await;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(WORKER_INTERVAL) => {}
            }
        }
    }

    /// Audits a grant's end, counts it, and tells the thread when time or a revocation ended
    /// it while the session lives on.
    async fn after_grant_end(&self, grant: &Grant) {
        let reason = grant.end_reason.unwrap_or(GrantEnd::Expired);
        let event: &'static str = reason.into();
        counter!(names::EGRESS_GRANTS_TOTAL, "event" => event).increment(1);
        self.audit_grant(grant, &format!("grant_{event}"), None, None)
            .await;
        if reason == GrantEnd::Expired {
            self.notice(
                &grant.session_id,
                &format!(
                    "⌛ The network grant for `{}` has expired; Claude must ask again to reach it.",
                    grant.domain
                ),
            )
            .await;
        }
    }

    async fn audit_grant(
        &self,
        grant: &Grant,
        action: &str,
        user: Option<(&str, &str)>,
        detail: Option<String>,
    ) {
        let thread = self
            .store
            .session(&grant.session_id)
            .await
            .ok()
            .flatten()
            .map(|s| s.thread_id);
        let detail = detail.or_else(|| {
            Some(format!(
                "grant {} ({}, {}), granted by {}",
                short_id(&grant.id),
                grant.scope,
                grant.expires_at.map_or_else(
                    || "until the session ends".to_owned(),
                    |e| format!("until {}", clock(e))
                ),
                grant.granted_by_name.as_deref().unwrap_or("someone")
            ))
        });
        let entry = AuditEntry {
            at: now_ms(),
            session_id: Some(grant.session_id.clone()),
            thread_id: thread,
            domain: Some(grant.domain.clone()),
            action: action.to_owned(),
            user_id: user.map(|u| u.0.to_owned()),
            user_name: user.map(|u| u.1.to_owned()),
            outcome: "ok".into(),
            detail,
        };
        if let Err(e) = self.store.append_audit(&entry).await {
            error!(error = %e, "cannot write the audit log");
        }
    }

    /// Runs one firewall change under the in-process lock and the cross-instance lease, within
    /// the lease. `None` when the lease could not be had (try again at the next round).
    async fn firewall_change<T, F, Fut>(&self, change: F) -> Option<Result<T, ApplyError>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApplyError>>,
    {
        // Across instances: a lease in storage, taken by whoever changes the alias and released
        // after. A holder that died blocks the others only until its lease expires.
        let lease = self.config.lease;
        let lease_ms = millis(lease);
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
                _ => return None,
            }
        }
        // The change must end within the lease, or another instance could start one too.
        let result = match tokio::time::timeout(lease * 4 / 5, change()).await {
            Ok(result) => result,
            Err(_) => Err(ApplyError {
                message: format!("the firewall did not answer within {:?}", lease * 4 / 5),
                permanent: false,
            }),
        };
        let _ = self.store.unlock(ALIAS_LOCK, &self.instance).await;
        Some(result)
    }

    /// Applies one approved request to the firewall, serialised with every other change;
    /// records its grant, confirms the alias holds the domain, then tells the agent.
    async fn apply(&self, request: ApprovalRequest) {
        let _in_process = self.apply_lock.lock().await;
        let firewall = Arc::clone(&self.firewall);
        let domain = request.domain.clone();
        let Some(result) = self
            .firewall_change(|| async move {
                let added = firewall.add(&domain).await?;
                // What the firewall enforces, not what was sent: read it back.
                if firewall.contains(&domain).await? {
                    Ok(added)
                } else {
                    Err(ApplyError {
                        message: format!("the alias does not list {domain} after saving it"),
                        permanent: false,
                    })
                }
            })
            .await
        else {
            return;
        };
        match result {
            Ok(added) => {
                let now = now_ms();
                if added {
                    counter!(names::FIREWALL_CHANGES_TOTAL, "change" => "added").increment(1);
                    if let Err(e) = self
                        .store
                        .record_firewall_domain(&request.domain, now)
                        .await
                    {
                        error!(error = %e, domain = %request.domain, "cannot record a domain the bot added");
                    }
                }
                let grant = match self.grant_for(&request, now).await {
                    Ok(grant) => grant,
                    Err(e) => {
                        error!(error = %e, "cannot record a grant; retrying");
                        let _ = self
                            .store
                            .record_approval_attempt_failed(
                                &request.id,
                                &e.to_string(),
                                now + 5_000,
                            )
                            .await;
                        return;
                    }
                };
                if !self
                    .store
                    .mark_approval_applied(&request.id, now)
                    .await
                    .unwrap_or(false)
                {
                    return;
                }
                self.audit(&request, None, "firewall_applied", None, "ok", None)
                    .await;
                if request.source_grant_id.is_some() {
                    if added {
                        counter!(names::FIREWALL_DRIFT_REPAIRS_TOTAL).increment(1);
                    }
                    self.notice(
                        &request.session_id,
                        &format!("✅ `{}` is in the firewall alias again.", request.domain),
                    )
                    .await;
                } else if let Some(grant) = &grant {
                    counter!(names::EGRESS_GRANTS_TOTAL, "event" => "granted").increment(1);
                    let by = request.decided_by_name.clone().unwrap_or_default();
                    self.update_card(
                        &request,
                        format!(
                            "✅ Approved by @{by} {}; the firewall allows it now",
                            self.scope_text(grant.scope, request.decided_at.unwrap_or(now))
                        ),
                    )
                    .await;
                }
                self.tell_agent(
                    &request.session_id,
                    format!("[NETWORK_APPROVED: {}]", request.domain),
                )
                .await;
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
                let next = now_ms() + millis(retry_delay(request.apply_attempts));
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
                    self.notice(&request.session_id, &format!("⚠️ `{}` is approved but the firewall could not be updated yet; the bot keeps retrying and will tell Claude when it works.", request.domain)).await;
                }
            }
        }
    }

    /// The grant an applied request gives its session: a new one for a decision, a shared one
    /// for another session's grant, none when the session's own grant was only put back.
    async fn grant_for(&self, request: &ApprovalRequest, now: i64) -> StoreResult<Option<Grant>> {
        let new = if let Some(source_id) = &request.source_grant_id {
            let Some(source) = self.store.grant(source_id).await? else {
                return Ok(None);
            };
            if source.session_id == request.session_id {
                return Ok(Some(source));
            }
            NewGrant {
                domain: request.domain.clone(),
                session_id: request.session_id.clone(),
                scope: source.scope,
                request_id: Some(request.id.clone()),
                source_grant_id: Some(source.id.clone()),
                granted_by_id: source.granted_by_id.clone(),
                granted_by_name: source.granted_by_name.clone(),
                granted_at: now,
                expires_at: source.expires_at,
            }
        } else {
            let scope = request.grant_scope.unwrap_or(GrantScope::Ttl);
            let decided = request.decided_at.unwrap_or(now);
            NewGrant {
                domain: request.domain.clone(),
                session_id: request.session_id.clone(),
                scope,
                request_id: Some(request.id.clone()),
                source_grant_id: None,
                granted_by_id: request.decided_by_id.clone(),
                granted_by_name: request.decided_by_name.clone(),
                granted_at: now,
                expires_at: (scope == GrantScope::Ttl)
                    .then(|| decided + millis(self.config.grant_ttl)),
            }
        };
        let grant = self.store.insert_grant(&new).await?;
        let action = if new.source_grant_id.is_some() {
            "grant_shared"
        } else {
            "granted"
        };
        self.audit_grant(
            &grant,
            action,
            new.granted_by_id
                .as_deref()
                .zip(new.granted_by_name.as_deref()),
            None,
        )
        .await;
        Ok(Some(grant))
    }

    /// Removes a domain the bot added and no live grant covers any more; checked again under
    /// the lock, right before the change.
    async fn remove(&self, domain: &str) {
        let _in_process = self.apply_lock.lock().await;
        match self
            .store
            .firewall_domains_to_remove(now_ms(), Some(domain))
            .await
        {
            Ok(still) if !still.is_empty() => {}
            _ => return,
        }
        let firewall = Arc::clone(&self.firewall);
        let owned = domain.to_owned();
        let Some(result) = self
            .firewall_change(|| async move { firewall.remove(&owned).await })
            .await
        else {
            return;
        };
        let entry = |action: &str, outcome: &str, detail: Option<String>| AuditEntry {
            at: now_ms(),
            domain: Some(domain.to_owned()),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            detail,
            ..AuditEntry::default()
        };
        match result {
            Ok(was_there) => {
                if let Err(e) = self.store.forget_firewall_domain(domain).await {
                    error!(error = %e, domain, "cannot forget a removed domain");
                }
                counter!(names::FIREWALL_CHANGES_TOTAL, "change" => "removed").increment(1);
                info!(
                    domain,
                    was_there, "removed a domain no grant covers from the alias"
                );
                let _ = self
                    .store
                    .append_audit(&entry(
                        "firewall_removed",
                        "ok",
                        (!was_there).then(|| "it was no longer in the alias".to_owned()),
                    ))
                    .await;
            }
            Err(e) => {
                let attempts = self
                    .store
                    .firewall_removal_attempts(domain)
                    .await
                    .unwrap_or(0);
                let next = now_ms() + millis(retry_delay(attempts));
                let _ = self
                    .store
                    .record_firewall_removal_failed(domain, &e.message, next)
                    .await;
                warn!(domain, error = %e, "cannot remove a domain from the alias; retrying");
                let _ = self
                    .store
                    .append_audit(&entry(
                        "firewall_remove_failed",
                        "retrying",
                        Some(e.message),
                    ))
                    .await;
            }
        }
    }

    /// Answers a request for `domain` that the live grant `grant` covers: confirmed against
    /// the alias, shared with this session when it is another session's, or put back (drift).
    async fn covered(&self, session: &Session, domain: &str, grant: Grant) -> Vec<String> {
        let _in_process = self.apply_lock.lock().await;
        match self.firewall.contains(domain).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(domain, session = %session.id, "a granted domain is missing from the alias; putting it back");
                return self
                    .repair(
                        session,
                        domain,
                        &grant,
                        "the firewall alias no longer has it",
                    )
                    .await;
            }
            Err(e) => {
                return self
                    .repair(
                        session,
                        domain,
                        &grant,
                        &format!("the firewall could not be read: {e}"),
                    )
                    .await;
            }
        }
        if grant.session_id == session.id {
            return vec![format!("[NETWORK_APPROVED: {domain}]")];
        }
        let shared = NewGrant {
            domain: domain.to_owned(),
            session_id: session.id.clone(),
            scope: grant.scope,
            request_id: None,
            source_grant_id: Some(grant.id.clone()),
            granted_by_id: grant.granted_by_id.clone(),
            granted_by_name: grant.granted_by_name.clone(),
            granted_at: now_ms(),
            expires_at: grant.expires_at,
        };
        let mine = match self.store.insert_grant(&shared).await {
            Ok(mine) => mine,
            Err(e) => {
                error!(error = %e, "cannot record a shared grant");
                return vec![format!(
                    "[NETWORK_DENIED: {domain}] the grant could not be recorded; ask again later"
                )];
            }
        };
        counter!(names::EGRESS_GRANTS_TOTAL, "event" => "shared").increment(1);
        self.audit_grant(
            &mine,
            "grant_shared",
            None,
            Some(format!(
                "already allowed: granted by @{} for session {} ({})",
                grant.granted_by_name.as_deref().unwrap_or("someone"),
                short_id(&grant.session_id),
                until_text(grant.expires_at)
            )),
        )
        .await;
        let _ = self
            .chat
            .post(
                &session.channel_id,
                Some(&session.thread_id),
                &format!(
                    "🌐 `{domain}` is already allowed: granted by @{} for session `{}` {}. Claude may use it.",
                    grant.granted_by_name.as_deref().unwrap_or("someone"),
                    short_id(&grant.session_id),
                    until_text(grant.expires_at)
                ),
            )
            .await;
        vec![format!("[NETWORK_APPROVED: {domain}]")]
    }

    /// Opens a request the bot decides itself to put `domain` back in the alias under `grant`;
    /// the agent is told once it is back.
    async fn repair(
        &self,
        session: &Session,
        domain: &str,
        grant: &Grant,
        why: &str,
    ) -> Vec<String> {
        match self
            .store
            .open_grant_repair(&session.id, grant, now_ms())
            .await
        {
            Ok(request) => {
                self.audit(
                    &request,
                    Some(&session.thread_id),
                    "drift",
                    None,
                    "retrying",
                    Some(format!("granted, but {why}; putting it back")),
                )
                .await;
                let _ = self
                    .chat
                    .post(
                        &session.channel_id,
                        Some(&session.thread_id),
                        &format!("⚠️ `{domain}` is granted, but {why}; the bot is putting it back and will tell Claude when it is."),
                    )
                    .await;
                self.wake.notify_one();
                Vec::new()
            }
            Err(e) => {
                error!(error = %e, "cannot open a repair request");
                vec![format!(
                    "[NETWORK_DENIED: {domain}] the request could not be recorded; ask again later"
                )]
            }
        }
    }

    /// Refuses a request before any card: posts why, audits, counts, and answers the agent.
    async fn refuse(
        &self,
        session: &Session,
        shown: &str,
        audit_domain: &str,
        why: &str,
    ) -> Vec<String> {
        let _ = self
            .chat
            .post(
                &session.channel_id,
                Some(&session.thread_id),
                &format!(
                    "🚫 Claude asked for network access to `{}`, which is refused: {why}",
                    shown.replace('`', "'")
                ),
            )
            .await;
        let entry = AuditEntry {
            at: now_ms(),
            session_id: Some(session.id.clone()),
            thread_id: Some(session.thread_id.clone()),
            domain: Some(audit_domain.chars().take(255).collect()),
            action: "requested".into(),
            outcome: "rejected".into(),
            detail: Some(why.to_owned()),
            ..AuditEntry::default()
        };
        let _ = self.store.append_audit(&entry).await;
        counter!(names::EGRESS_GRANTS_TOTAL, "event" => "refused").increment(1);
        vec![format!("[NETWORK_DENIED: {shown}] {why}")]
    }
}

/// Ends `session`'s grants for `domain` at once (`!revoke`), audited with who did it; the
/// firewall worker removes the domain from the alias within a few seconds when no other grant
/// covers it. Returns the grants ended (none when the session held none).
///
/// # Errors
/// [`StoreError`] when storage fails.
pub async fn revoke(
    store: &Store,
    session: &Session,
    domain: &str,
    user: (&str, &str),
) -> StoreResult<Vec<Grant>> {
    let ended = store.revoke_grants(&session.id, domain, now_ms()).await?;
    for grant in &ended {
        counter!(names::EGRESS_GRANTS_TOTAL, "event" => "revoked").increment(1);
        let entry = AuditEntry {
            at: now_ms(),
            session_id: Some(session.id.clone()),
            thread_id: Some(session.thread_id.clone()),
            domain: Some(grant.domain.clone()),
            action: "grant_revoked".into(),
            user_id: Some(user.0.to_owned()),
            user_name: Some(user.1.to_owned()),
            outcome: "ok".into(),
            detail: Some(format!("grant {}", short_id(&grant.id))),
        };
        store.append_audit(&entry).await?;
    }
    Ok(ended)
}

/// A Markdown list of grants, one line each: domain, session, scope, who granted, until when.
pub fn grants_text(grants: &[Grant], with_session: bool) -> String {
    if grants.is_empty() {
        return "No live network grants.".into();
    }
    let mut out = String::from("**Network grants**\n");
    for g in grants {
        let session = if with_session {
            format!(" for session `{}`", short_id(&g.session_id))
        } else {
            String::new()
        };
        let shared = if g.source_grant_id.is_some() {
            ", shared"
        } else {
            ""
        };
        out.push_str(&format!(
            "- `{}`{session}: granted by @{}{shared}, {}\n",
            g.domain,
            g.granted_by_name.as_deref().unwrap_or("someone"),
            until_text(g.expires_at)
        ));
    }
    out
}

/// The action ids of a card's buttons (also the signed `action`); Mattermost action ids are
/// alphanumeric.
/// The `kind` of a network approval card's buttons (the click router's key). Cards without a
/// kind (posted before kinds existed) are network cards too.
pub const CARD_KIND: &str = "network";

const ACTION_APPROVE_TTL: &str = "approve";
const ACTION_APPROVE_SESSION: &str = "approvesession";
const ACTION_DENY: &str = "deny";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// Backoff after `attempts` failed attempts: 5 s doubling up to 5 min.
fn retry_delay(attempts: i64) -> Duration {
    let attempts = u32::try_from(attempts.max(0)).unwrap_or(u32::MAX);
    FIRST_RETRY_DELAY
        .checked_mul(2u32.saturating_pow(attempts.min(16)))
        .unwrap_or(MAX_RETRY_DELAY)
        .min(MAX_RETRY_DELAY)
}

/// "8 h", "90 min", "45 s".
fn span(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{} h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// "until 14:00 UTC" or "until the session ends".
fn until_text(expires_at: Option<i64>) -> String {
    expires_at.map_or_else(
        || "until the session ends".to_owned(),
        |e| format!("until {}", clock(e)),
    )
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
                return self
                    .refuse(session, &raw, &raw, &format!("it cannot be approved: {e}"))
                    .await
            }
        };
        if let Err(refusal) = self.config.policy.check(&domain).await {
            return self
                .refuse(session, &domain, &domain, &refusal.to_string())
                .await;
        }
        let now = now_ms();
        match self
            .store
            .live_grant_for_domain(&domain, &session.id, now)
            .await
        {
            Ok(Some(grant)) => return self.covered(session, &domain, grant).await,
            Ok(None) => {}
            Err(e) => {
                error!(error = %e, "cannot read grants");
                return vec![format!(
                    "[NETWORK_DENIED: {domain}] the request could not be checked; ask again later"
                )];
            }
        }
        let pending = self.store.pending_approvals(&session.id).await.unwrap_or(0);
        if pending >= i64::from(self.config.max_pending) {
            // A repeated marker for a domain that already has its card is not a new card.
            let already = self
                .store
                .pending_approval(&session.id, &domain)
                .await
                .ok()
                .flatten()
                .is_some();
            if already {
                return Vec::new();
            }
            return self
                .refuse(
                    session,
                    &domain,
                    &domain,
                    &format!(
                        "this session already has {pending} network requests waiting for a decision (SM_MAX_PENDING_APPROVALS); wait for them to be decided"
                    ),
                )
                .await;
        }
        let ttl = millis(self.config.ttl);
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
