//! Spending caps: `SM_SESSION_BUDGET_USD` per session and `SM_ORCHESTRATOR_BUDGET_USD` for an
//! orchestrator and all its children together, counted from the CLI's per-turn cost
//! (`total_cost_usd` of each `result`, stored as the session's `cost_usd`).
//!
//! Before a session's agent is sent a turn, [`over`] compares what was spent with the cap
//! (the configured budget plus what was added to it). Over the cap the turn waits, and so do
//! the ones after it: the session is *held*. The turn running when the cap is reached always
//! finishes. The session's actor tells [`Budgets`] ([`BudgetEvent::Reached`]), which posts one
//! card per cap to the budget owner's thread (the session, or the orchestrator for a family):
//! **Add $N** (N = the configured budget) sets the cap N dollars above what was spent and
//! releases every held session of
//! the budget; **End session** stops the owner (and with it an orchestrator's children). Only
//! the owner and admins may click; buttons are signed like every card.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access::{Act, Roles};
use crate::approval::signing;
use crate::chat::{ActionCard, CardClick, CardClickHandler, ChatOutbound, ClickError, ClickReply};
use crate::session::short_id;
use crate::store::{Session, SessionKind, Store, StoreError};

/// The caps, in US dollars; `None`: no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetLimits {
    /// `SM_SESSION_BUDGET_USD`.
    pub session: Option<f64>,
    /// `SM_ORCHESTRATOR_BUDGET_USD`.
    pub orchestrator: Option<f64>,
}

impl BudgetLimits {
    /// Whether any cap is set.
    pub fn any(&self) -> bool {
        self.session.is_some() || self.orchestrator.is_some()
    }
}

/// Which budget a cap belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    /// One session's own budget.
    Session,
    /// An orchestrator's, shared with its children.
    Orchestrator,
}

/// A budget's state.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    /// Whose budget: the session itself, or its orchestrator.
    pub owner: Session,
    /// Which cap.
    pub scope: BudgetScope,
    /// Spent so far (the owner alone, or the orchestrator and its children), in dollars.
    pub spent: f64,
    /// The configured budget plus what was added, in dollars.
    pub cap: f64,
    /// The configured budget (what **Add** adds), in dollars.
    pub step: f64,
}

impl BudgetState {
    /// Whether the spending reached the cap.
    pub fn reached(&self) -> bool {
        self.spent >= self.cap
    }

    /// A line for `!cost`.
    pub fn line(&self) -> String {
        let whose = match self.scope {
            BudgetScope::Session => "this session's budget".to_owned(),
            BudgetScope::Orchestrator => format!(
                "the budget of orchestrator `{}` and its sessions",
                short_id(&self.owner.id)
            ),
        };
        format!("${:.4} of ${:.2} ({whose})", self.spent, self.cap)
    }
}

/// Every budget that applies to `session`: its own, and its orchestrator family's.
///
/// # Errors
/// [`StoreError`] when storage cannot be read.
pub async fn budgets_of(
    store: &Store,
    limits: BudgetLimits,
    session: &Session,
) -> Result<Vec<BudgetState>, StoreError> {
    let mut out = Vec::new();
    let limits = limits_of(limits, session);
    if let Some(step) = limits.session {
        // The session's own row, fresh (the actor's copy does not follow the costs).
        let own = store
            .session(&session.id)
            .await?
            .unwrap_or_else(|| session.clone());
        out.push(BudgetState {
            spent: own.stats.cost_usd,
            cap: step + own.budget_added_usd,
            step,
            scope: BudgetScope::Session,
            owner: own,
        });
    }
    if let Some(step) = limits.orchestrator {
        let root_id = match (session.kind, &session.parent_id) {
            (SessionKind::Orchestrator, _) => Some(session.id.clone()),
            (_, Some(parent)) => Some(parent.clone()),
            _ => None,
        };
        if let Some(root) = match root_id {
            Some(id) => store.session(&id).await?,
            None => None,
        } {
            let children: f64 = store
                .children(&root.id)
                .await?
                .iter()
                .map(|c| c.stats.cost_usd)
                .sum();
            out.push(BudgetState {
                spent: root.stats.cost_usd + children,
                cap: step + root.budget_added_usd,
                step,
                scope: BudgetScope::Orchestrator,
                owner: root,
            });
        }
    }
    Ok(out)
}

/// The caps that apply to `session`: its profile's own budget (`budget_usd`) in place of
/// `SM_SESSION_BUDGET_USD`, the configured family cap.
pub fn limits_of(limits: BudgetLimits, session: &Session) -> BudgetLimits {
    match &session.profile {
        Some(profile) => BudgetLimits {
            session: profile.session_budget(limits.session),
            ..limits
        },
        None => limits,
    }
}

/// The first budget of `session` whose cap is reached, if any (storage errors count as
/// not reached: a database outage does not hold sessions).
pub async fn over(store: &Store, limits: BudgetLimits, session: &Session) -> Option<BudgetState> {
    if !limits_of(limits, session).any() {
        return None;
    }
    match budgets_of(store, limits, session).await {
        Ok(states) => states.into_iter().find(BudgetState::reached),
        Err(e) => {
            warn!(session = %session.id, error = %e, "cannot read the session's spending");
            None
        }
    }
}

/// What a session's actor tells [`Budgets`].
#[derive(Debug, Clone)]
pub enum BudgetEvent {
    /// `session` is held: `state` reached its cap.
    Reached {
        /// The held session.
        session: Box<Session>,
        /// The budget that is spent.
        state: Box<BudgetState>,
    },
}

/// What [`Budgets`] needs from the session runtime.
#[async_trait]
pub trait BudgetRelease: Send + Sync + 'static {
    /// Lets the held session `session_id` go on (it checks its budgets again).
    async fn release(&self, session_id: &str);
    /// Stops `owner` (and, for an orchestrator, its children), as `!stop` by `by` would.
    async fn end(&self, owner: &Session, by: &str) -> Result<(), String>;
}

/// Settings of [`Budgets`].
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    /// The caps.
    pub limits: BudgetLimits,
    /// Where clicks go.
    pub callback_url: String,
    /// Signs the buttons.
    pub secret: SecretString,
    /// Who is an admin.
    pub roles: Roles,
}

/// The `kind` of a budget card's context.
pub const CARD_KIND: &str = "budget";
const ACTION_ADD: &str = "addbudget";
const ACTION_END: &str = "endsession";

/// Budget cards and their clicks.
pub struct Budgets {
    store: Store,
    chat: Arc<dyn ChatOutbound>,
    release: Arc<dyn BudgetRelease>,
    config: BudgetConfig,
    /// (owner, cap in cents) already carded: one card per cap.
    carded: Mutex<HashSet<(String, i64)>>,
}

/// Whole cents of `dollars`, for signing and comparing caps.
fn cents(dollars: f64) -> i64 {
    // Caps are a few thousand dollars at most (the setting's range).
    (dollars * 100.0).round() as i64
}

impl Budgets {
    /// The budget flow over storage, chat and the session runtime.
    pub fn new(
        store: Store,
        chat: Arc<dyn ChatOutbound>,
        release: Arc<dyn BudgetRelease>,
        config: BudgetConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            chat,
            release,
            config,
            carded: Mutex::new(HashSet::new()),
        })
    }

    /// Handles `events` until they end or `cancel` fires.
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::Receiver<BudgetEvent>,
        cancel: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            let BudgetEvent::Reached { session, state } = event;
            self.reached(&session, &state).await;
        }
    }

    /// Posts the card for a reached cap (once per owner and cap).
    async fn reached(&self, session: &Session, state: &BudgetState) {
        let key = (state.owner.id.clone(), cents(state.cap));
        let first = self
            .carded
            .lock()
            .map(|mut c| c.insert(key))
            .unwrap_or(false);
        info!(session = %session.id, owner = %state.owner.id, spent = state.spent, cap = state.cap, "budget reached: the session is held");
        if !first {
            return;
        }
        let card = self.card(state, None);
        if let Err(e) = self
            .chat
            .post_card(&state.owner.channel_id, &state.owner.thread_id, &card)
            .await
        {
            warn!(error = %e, "cannot post a budget card");
        }
    }

    fn card(&self, state: &BudgetState, status: Option<String>) -> ActionCard {
        let whose = match state.scope {
            BudgetScope::Session => format!("Session `{}`", short_id(&state.owner.id)),
            BudgetScope::Orchestrator => format!(
                "Orchestrator `{}` and its sessions",
                short_id(&state.owner.id)
            ),
        };
        let mut text = format!(
            "{whose} spent ${:.4} of ${:.2}. Claude finished its turn; new messages wait.",
            state.spent, state.cap
        );
        let actions = match status {
            Some(status) => {
                text.push_str(&format!("\n\n{status}"));
                Vec::new()
            }
            None => {
                text.push_str("\n\nThe session's owner or an admin decides.");
                let cap = cents(state.cap);
                [
                    (ACTION_ADD, format!("Add ${:.2}", state.step), "primary"),
                    (ACTION_END, "End session".to_owned(), "danger"),
                ]
                .into_iter()
                .map(|(action, label, style)| {
                    signing::signed_action(
                        &self.config.secret,
                        CARD_KIND,
                        &state.owner.id,
                        action,
                        cap,
                        label,
                        style,
                    )
                })
                .collect()
            }
        };
        ActionCard {
            title: "💰 Budget reached".into(),
            text,
            actions,
            callback_url: self.config.callback_url.clone(),
            color: Some("#d29922".into()),
        }
    }

    async fn decide(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        // The signed `expires` of a budget card is the cap it was posted for, in cents.
        let (owner_id, action, cap) = signing::verified_click(&self.config.secret, &click.context)
            .inspect_err(|e| {
                if *e == ClickError::Forbidden {
                    warn!(user = %click.user_id, "refused a budget click with a bad signature");
                }
            })?;
        let unavailable = |e: StoreError| {
            warn!(error = %e, "cannot read a budget");
            ClickError::Unavailable
        };
        let owner = self
            .store
            .session(owner_id)
            .await
            .map_err(unavailable)?
            .ok_or(ClickError::NotFound)?;
        let participants = self
            .store
            .participants(owner_id)
            .await
            .map_err(unavailable)?;
        if !self
            .config
            .roles
            .role(&click.user_id, &owner, &participants)
            .may(Act::Manage)
        {
            return Ok(ClickReply::Notice(
                "Only the session's owner or an admin may decide this.".into(),
            ));
        }
        if !owner.state().is_active() {
            return Ok(ClickReply::Notice("This session has ended.".into()));
        }
        let limits = limits_of(self.config.limits, &owner);
        let scope = if owner.kind == SessionKind::Orchestrator && limits.orchestrator.is_some() {
            BudgetScope::Orchestrator
        } else {
            BudgetScope::Session
        };
        let step = match scope {
            BudgetScope::Orchestrator => limits.orchestrator,
            BudgetScope::Session => limits.session,
        }
        .unwrap_or(0.0);
        let by = format!("@{}", click.user_name);
        let status = match action {
            ACTION_ADD => {
                // N more dollars from what was spent (the turn that crossed the cap may have
                // gone past it); single use: it applies only while the cap is the card's.
                let spent = budgets_of(&self.store, limits, &owner)
                    .await
                    .map_err(unavailable)?
                    .into_iter()
                    .find(|s| s.scope == scope)
                    .map_or(0.0, |s| s.spent);
                let old_cap = cap as f64 / 100.0;
                let raise = (spent - old_cap).max(0.0) + step;
                let added = self
                    .store
                    .add_budget(owner_id, raise, step, cap)
                    .await
                    .map_err(unavailable)?;
                if !added {
                    return Ok(ClickReply::Notice("This budget was already raised.".into()));
                }
                let mut held = vec![owner.id.clone()];
                if scope == BudgetScope::Orchestrator {
                    held.extend(
                        self.store
                            .children(owner_id)
                            .await
                            .map_err(unavailable)?
                            .into_iter()
                            .map(|c| c.id),
                    );
                }
                for id in &held {
                    self.release.release(id).await;
                }
                format!(
                    "➕ {by} added ${step:.2} to what was spent: the budget is now ${:.2}.",
                    old_cap + raise
                )
            }
            ACTION_END => {
                if let Err(why) = self.release.end(&owner, &click.user_id).await {
                    return Ok(ClickReply::Notice(format!("Could not end it: {why}")));
                }
                format!("⏹️ Ended by {by}.")
            }
            other => return Err(ClickError::BadRequest(format!("unknown action {other:?}"))),
        };
        let state = BudgetState {
            spent: owner.stats.cost_usd,
            cap: cap as f64 / 100.0,
            step,
            scope,
            owner,
        };
        Ok(ClickReply::ReplaceCard(self.card(&state, Some(status))))
    }
}

#[async_trait]
impl CardClickHandler for Budgets {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        self.decide(click).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_compare_in_cents_and_read_for_people() {
        assert_eq!(cents(0.1), 10);
        assert_eq!(cents(2.999), 300);
        let limits = BudgetLimits::default();
        assert!(!limits.any());
        assert!(BudgetLimits {
            session: Some(1.0),
            orchestrator: None
        }
        .any());
    }
}
