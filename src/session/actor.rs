//! One session's actor: it owns the agent process and everything that talks to it.
//!
//! The actor brings the session up (or resumes it after a bot restart), then loops over three
//! inputs: requests from its [`SessionHandle`], lines from the agent's stdout (read all the
//! time, not only during a turn), and the agent's exit. User messages that arrive during a turn
//! (or while the session is still starting) are queued in order and sent when the turn ends;
//! `clear` and `restart` wait for the turn to end too.
//!
//! Lifetimes: a session without a message for `SM_SESSION_IDLE_SECS` hibernates (its agent
//! closed, its container stopped, the state stored) until a message wakes it with the
//! conversation resumed; one older than `SM_SESSION_MAX_AGE_SECS` is ended
//! ([`EndReason::MaxAge`]).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::agent::{Agent, AgentError};
use super::prepare::StartError;
use super::{AutoCompact, Delivery, Manager, MarkerEvent, SessionError, SessionPlan, MAX_QUEUED};
use crate::agent::markers::{MarkerScanner, MarkerSet, ScanEvent};
use crate::agent::stream_json::{self, AgentEvent, AssistantBlock};
use crate::budget::{self, BudgetEvent};
use crate::chat::progress::Progress;
use crate::chat::render::CoalesceConfig;
use crate::chat::stream::{spawn_thread_output, TurnInput};
use crate::chat::PostRef;
use crate::permission::{PermissionAnswer, PermissionAsk, PermissionEvent, PermissionMode};
use crate::store::{now_ms, EndReason, Platform, SessionKind, SessionState, UsageDelta};

/// Requests to an actor.
#[derive(Debug)]
pub(super) enum Request {
    /// A message for the agent (a person's, or one the bot injects).
    Message {
        turn: Turn,
        reply: oneshot::Sender<Delivery>,
    },
    /// `/compact`.
    Compact { reply: oneshot::Sender<()> },
    /// New conversation.
    Clear { reply: oneshot::Sender<()> },
    /// Same conversation, new process.
    Restart { reply: oneshot::Sender<()> },
    /// Stop the turn in flight (the CLI's `interrupt` control request); answers whether one
    /// was running.
    Interrupt { reply: oneshot::Sender<bool> },
    /// Stop the agent; the manager cleans up.
    Shutdown { reply: oneshot::Sender<()> },
    /// The answer to the agent's permission question `request_id`.
    Permission {
        request_id: String,
        answer: PermissionAnswer,
        reply: oneshot::Sender<()>,
    },
    /// The session's budget was raised: check it again and go on.
    Release { reply: oneshot::Sender<()> },
    /// Switch the agent's permission mode (`set_permission_mode`); answers whether the agent
    /// took it.
    SetMode {
        mode: PermissionMode,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A user turn for the agent: its text and, for a person's chat message, the record
/// ([`crate::store::Store::record_inbound`]) marked handled once the agent has it. Turns
/// still queued when the bot stops are handed out again after it comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// What the agent is sent.
    pub text: String,
    /// The chat message it came from (platform, post id), when it came from one.
    pub inbound: Option<(Platform, String)>,
}

impl Turn {
    /// A turn the bot itself sends (approval answers, orchestrator notes, `/compact`).
    pub fn injected(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            inbound: None,
        }
    }
}

/// A cloneable handle to a running actor.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub(super) tx: mpsc::Sender<Request>,
}

impl SessionHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SessionError::NotRunning("the session's agent is not running".into()))?;
        answer
            .await
            .map_err(|_| SessionError::NotRunning("the session's agent stopped".into()))
    }

    /// Delivers a message (queued during a turn).
    ///
    /// # Errors
    /// [`SessionError::NotRunning`] when the actor is gone.
    pub async fn message(&self, turn: Turn) -> Result<Delivery, SessionError> {
        self.ask(|reply| Request::Message { turn, reply }).await
    }

    /// Asks for `/compact`.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn compact(&self) -> Result<(), SessionError> {
        self.ask(|reply| Request::Compact { reply }).await
    }

    /// Asks for a new conversation.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn clear(&self) -> Result<(), SessionError> {
        self.ask(|reply| Request::Clear { reply }).await
    }

    /// Asks for a restart that resumes the conversation.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn restart(&self) -> Result<(), SessionError> {
        self.ask(|reply| Request::Restart { reply }).await
    }

    /// Interrupts the turn in flight; `false` when none was running.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn interrupt(&self) -> Result<bool, SessionError> {
        self.ask(|reply| Request::Interrupt { reply }).await
    }

    /// Hands the answer to a permission question to the agent.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn permission(
        &self,
        request_id: String,
        answer: PermissionAnswer,
    ) -> Result<(), SessionError> {
        self.ask(|reply| Request::Permission {
            request_id,
            answer,
            reply,
        })
        .await
    }

    /// Lets a session held by its budget check it again.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn release(&self) -> Result<(), SessionError> {
        self.ask(|reply| Request::Release { reply }).await
    }

    /// Switches the agent's permission mode; `Err` with the reason when the agent could not
    /// be told.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`].
    pub async fn set_mode(&self, mode: PermissionMode) -> Result<Result<(), String>, SessionError> {
        self.ask(|reply| Request::SetMode { mode, reply }).await
    }

    /// Stops the agent and waits until it is gone.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`] when it already was.
    pub async fn shutdown(&self) -> Result<(), SessionError> {
        self.ask(|reply| Request::Shutdown { reply }).await
    }
}

/// What to do once the current turn is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Clear,
    Restart,
}

/// How the actor's life ended.
enum Ending {
    /// The session is over: clean up, with this reason and detail.
    End(EndReason, Option<String>),
    /// The bot is shutting down: leave the session for `recover` at the next start.
    Detach,
}

/// What one input led to.
enum Step {
    Continue,
    /// The session is over.
    Exit(EndReason, Option<String>),
    /// The bot is shutting down.
    Detach,
    /// The agent's stream ended unexpectedly (exit or a lost SSH connection): try to resume.
    AgentLost(String),
    /// No message for `SM_SESSION_IDLE_SECS`: hibernate until the next one.
    Hibernate,
}

/// How an agent process is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// Same conversation, after the process was lost (the caller tells the thread).
    Resume,
    /// Same conversation, asked for with `restart`.
    Restart,
    /// A new conversation, asked for with `clear`.
    Clear,
}

/// How long an interrupted turn may take to end before the agent is restarted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(15);

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A duration in whole milliseconds (saturating).
fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When a session created at `created_at` (Unix ms) reaches `max_age` (zero: never), as an
/// instant of the clock whose `now` is `now_ms` on the wall clock. Already past: `now`.
fn max_age_deadline(
    created_at: i64,
    max_age: Duration,
    now_ms: i64,
    now: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    if max_age.is_zero() {
        return None;
    }
    let left = created_at
        .saturating_add(duration_ms(max_age))
        .saturating_sub(now_ms)
        .max(0);
    // Past the clock's range: never.
    now.checked_add(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
}

/// How many times a lost agent is resumed within [`RESUME_WINDOW`] before the session ends.
const RESUME_BUDGET: usize = 3;
/// The window [`RESUME_BUDGET`] counts in.
const RESUME_WINDOW: Duration = Duration::from_secs(600);

/// One session's actor. It owns itself: no field is shared, so none is locked.
pub(super) struct Actor {
    manager: Arc<Manager>,
    plan: SessionPlan,
    /// `None` when resuming after a bot restart.
    progress: Option<PostRef>,
    /// The agent process's running `total_cost_usd`, to turn it into per-turn amounts.
    last_total_cost: f64,
    /// Orchestrators: when to compact.
    auto_compact: AutoCompact,
    /// Markers found in the agent's output, not yet taken by the marker router. The actor
    /// never waits for the router (the router may be waiting for this actor).
    outbox: VecDeque<MarkerEvent>,
    /// Whether a turn is running.
    busy: bool,
    /// The message of the running turn, until the agent shows it got it (any output of the
    /// turn): if the agent is lost before that, the message is sent again to its successor.
    in_flight: Option<Turn>,
    /// When the running turn started (for `SM_TURN_TIMEOUT_SECS`).
    turn_started: Option<tokio::time::Instant>,
    /// When the bot asked the agent to interrupt the running turn, if it did.
    interrupted_at: Option<tokio::time::Instant>,
    /// The agent is being replaced to abandon a turn the thread was already told about: no
    /// message is sent again and no "connection lost" note is posted.
    abandoning: bool,
    /// What to do once the current turn is over.
    pending: Pending,
    /// The last agent started had nothing to resume (the conversation had no turn yet), so
    /// it started the conversation under its id: nothing was lost.
    resumed_empty: bool,
    /// A permission question denied in the thread: (its request id, until when a reply is
    /// taken as the reason, who denied it).
    deny_reason: Option<(String, tokio::time::Instant, String)>,
    /// Permission questions to deny at once (the permission flow could not take them).
    pending_denials: Vec<String>,
    /// A budget's cap is reached: turns wait (see [`crate::budget`]).
    held: bool,
    scanner: MarkerScanner,
    /// Tool calls shown in this turn (the CLI may repeat one).
    seen_tools: HashSet<String>,
    /// The last time something happened (a request, a turn running or ending): the session
    /// hibernates `SM_SESSION_IDLE_SECS` after it.
    last_active: tokio::time::Instant,
}

impl Actor {
    pub(super) fn new(manager: Arc<Manager>, plan: SessionPlan, progress: Option<PostRef>) -> Self {
        let auto_compact = AutoCompact::new(
            manager.config.orchestrator_compact_threshold,
            super::AUTO_COMPACT_COOLDOWN,
        );
        let scanner = MarkerScanner::new(match plan.session.kind {
            SessionKind::Orchestrator => MarkerSet::Orchestrator,
            _ => MarkerSet::Agent,
        });
        Self {
            manager,
            plan,
            progress,
            last_total_cost: 0.0,
            auto_compact,
            outbox: VecDeque::new(),
            busy: false,
            in_flight: None,
            abandoning: false,
            turn_started: None,
            interrupted_at: None,
            pending: Pending::None,
            resumed_empty: false,
            deny_reason: None,
            pending_denials: Vec::new(),
            held: false,
            scanner,
            seen_tools: HashSet::new(),
            last_active: tokio::time::Instant::now(),
        }
    }

    /// Runs the session until it ends or the bot detaches it.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let (output, output_task) = spawn_thread_output(
            Arc::clone(&self.manager.chat),
            self.plan.session.channel_id.clone(),
            self.plan.session.thread_id.clone(),
            CoalesceConfig::for_post_limit(self.manager.chat.max_post_chars()),
        );
        let mut queue: VecDeque<Turn> = VecDeque::new();
        let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
        let ending = self.live(&mut rx, &output, &mut queue, &mut waiters).await;
        let _ = output.send(TurnInput::EndTurn).await;
        drop(output);
        let _ = output_task.await;
        self.end(ending, queue, waiters).await;
    }

    /// The one ending of every path: tell the thread what was not delivered, clean up (unless
    /// detached), answer whoever waits for the stop, and hand over the markers still held.
    async fn end(
        mut self,
        ending: Ending,
        queue: VecDeque<Turn>,
        waiters: Vec<oneshot::Sender<()>>,
    ) {
        let undelivered = queue.len();
        self.close_questions(match ending {
            Ending::Detach => "the bot restarted; Claude asks again if it needs to",
            Ending::End(..) => "the session ended",
        });
        match ending {
            Ending::Detach => {
                // People's messages stay recorded and unhandled: they are delivered after the
                // restart. Only what the bot itself queued is lost with this process.
                let lost = queue.iter().filter(|t| t.inbound.is_none()).count();
                if lost > 0 {
                    self.manager
                        .say(&self.plan.session, &format!("⚠️ The bot is restarting; {lost} queued note(s) from the bot to Claude were not delivered."))
                        .await;
                }
                if undelivered > lost {
                    info!(session = %self.plan.session.id, queued = undelivered - lost, "queued messages wait for the restart");
                }
            }
            Ending::End(reason, detail) => {
                for turn in &queue {
                    if let Some((platform, post_id)) = &turn.inbound {
                        if let Err(e) = self
                            .manager
                            .store
                            .mark_inbound_handled(*platform, post_id)
                            .await
                        {
                            warn!(error = %e, post = %post_id, "cannot mark an undelivered message handled");
                        }
                    }
                }
                if undelivered > 0 {
                    self.manager
                        .say(
                            &self.plan.session,
                            &format!("{undelivered} queued message(s) were not delivered because the session ended."),
                        )
                        .await;
                }
                self.manager
                    .finish(&self.plan.session.id, reason, detail)
                    .await;
            }
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
        for event in self.outbox.drain(..) {
            if self.manager.markers.try_send(event).is_err() {
                warn!(session = %self.plan.session.id, "a marker printed as the session ended was not handled");
            }
        }
    }

    /// Brings the session up, then serves requests and the agent's output until it ends.
    async fn live(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        output: &mpsc::Sender<TurnInput>,
        queue: &mut VecDeque<Turn>,
        waiters: &mut Vec<oneshot::Sender<()>>,
    ) -> Ending {
        if self
            .max_age_deadline()
            .is_some_and(|at| at <= tokio::time::Instant::now())
        {
            return self.too_old().await;
        }
        let started = if self.plan.resume && self.plan.session.is_hibernating() {
            // It went to sleep before the bot restarted: it sleeps on, its container stopped,
            // until its next message.
            info!(session = %self.plan.session.id, "the session hibernates; it is woken by its next message");
            self.hibernate(rx, queue, waiters, false).await
        } else {
            self.start_up(rx, queue, waiters).await
        };
        let mut agent = match started {
            Ok(agent) => agent,
            Err(ending) => return ending,
        };
        self.last_active = tokio::time::Instant::now();
        let markers = self.manager.markers.clone();
        let mut resumes: Vec<tokio::time::Instant> = Vec::new();
        self.next_turn(&mut agent, queue).await;
        loop {
            if !self.manager.gate.is_open() {
                // Suspended (see `crate::leader`): no input to the agent, none of its output
                // read (it waits in the pipe), nothing posted, until this instance acts again.
                // A standby lets the session go: the active instance resumes it.
                info!(session = %self.plan.session.id, "this instance is suspended: the session waits");
                if self.manager.gate.opened().await.is_err() {
                    agent.close().await;
                    return Ending::Detach;
                }
                info!(session = %self.plan.session.id, "this instance acts again: the session goes on");
                self.next_turn(&mut agent, queue).await;
            }
            let gate = self.manager.gate.clone();
            let was_busy = self.busy;
            let idle_deadline = self.idle_deadline(queue);
            let step = tokio::select! {
                // Suspended: the top of the loop waits.
                () = gate.closed() => continue,
                request = rx.recv() => {
                    self.last_active = tokio::time::Instant::now();
                    self.on_request(request, &mut agent, queue, waiters).await
                }
                line = agent.next_line() => match line {
                    Ok(Some(line)) => {
                        self.on_line(&line, output).await;
                        for request_id in std::mem::take(&mut self.pending_denials) {
                            let answer = PermissionAnswer::Deny {
                                message: "The bot could not put this question to the chat thread, so it was denied.".into(),
                            };
                            self.answer_permission(&mut agent, &request_id, &answer).await;
                        }
                        Step::Continue
                    }
                    Ok(None) => Step::AgentLost("the agent's output ended".into()),
                    Err(e @ super::agent::LineError::TooLong(_)) => {
                        // The turn ends here: the agent is restarted on the same conversation.
                        // It answered the message (too long), so it is not sent again.
                        self.in_flight = None;
                        self.abandoning = true;
                        self.manager
                            .say(&self.plan.session, &format!("❌ {e}; this turn was ended. Ask for a shorter answer (for example, to write long output to a file)."))
                            .await;
                        Step::AgentLost(e.to_string())
                    }
                    Err(e) => Step::AgentLost(e.to_string()),
                },
                () = sleep_until_or_never(self.turn_deadline()) => {
                    if self.interrupted_at.is_some() {
                        // Interrupted and still running: give up on the turn, restart the agent.
                        self.in_flight = None;
                        self.abandoning = true;
                        self.manager
                            .say(&self.plan.session, "⏹️ Claude did not stop after the interrupt; it was restarted on the same conversation.")
                            .await;
                        Step::AgentLost("the turn did not end after an interrupt".into())
                    } else {
                        let limit = self.manager.config.turn_timeout.as_secs();
                        self.manager
                            .say(&self.plan.session, &format!("⏱️ This turn ran longer than {limit} s (SM_TURN_TIMEOUT_SECS); interrupting it."))
                            .await;
                        self.interrupt(&mut agent).await;
                        Step::Continue
                    }
                }
                () = sleep_until_or_never(self.deny_reason.as_ref().map(|d| d.1)) => {
                    // Nobody said why: the agent is told who denied it.
                    if let Some((request_id, _, by)) = self.deny_reason.take() {
                        let answer = PermissionAnswer::Deny { message: format!("Denied by {by}.") };
                        self.answer_permission(&mut agent, &request_id, &answer).await;
                    }
                    Step::Continue
                }
                () = sleep_until_or_never(idle_deadline) => Step::Hibernate,
                () = sleep_until_or_never(self.max_age_deadline()) => {
                    agent.close().await;
                    return self.too_old().await;
                }
                permit = markers.reserve(), if !self.outbox.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(event) = self.outbox.pop_front() {
                                permit.send(event);
                            }
                        }
                        Err(_) => {
                            warn!(session = %self.plan.session.id, "markers cannot be handled (the router stopped)");
                            self.outbox.clear();
                        }
                    }
                    Step::Continue
                }
            };
            if was_busy || self.busy || !queue.is_empty() {
                // A turn ran (or ended) meanwhile, or messages wait for one.
                self.last_active = tokio::time::Instant::now();
            }
            match step {
                Step::Continue => {}
                Step::Hibernate => {
                    agent.close().await;
                    match self.hibernate(rx, queue, waiters, true).await {
                        Ok(woken) => agent = woken,
                        Err(ending) => return ending,
                    }
                    self.last_active = tokio::time::Instant::now();
                }
                Step::Exit(reason, detail) => {
                    agent.close().await;
                    return Ending::End(reason, detail);
                }
                Step::Detach => {
                    agent.close().await;
                    return Ending::Detach;
                }
                Step::AgentLost(why) => {
                    resumes.retain(|t| t.elapsed() < RESUME_WINDOW);
                    if resumes.len() >= RESUME_BUDGET {
                        agent.close().await;
                        return Ending::End(
                            EndReason::AgentExited,
                            Some(format!(
                                "{why}; it stopped {RESUME_BUDGET} times in {} minutes",
                                RESUME_WINDOW.as_secs() / 60
                            )),
                        );
                    }
                    resumes.push(tokio::time::Instant::now());
                    warn!(session = %self.plan.session.id, %why, "agent lost; resuming the conversation");
                    let _ = output.send(TurnInput::EndTurn).await;
                    self.scanner.reset();
                    self.seen_tools.clear();
                    let was_busy = std::mem::take(&mut self.busy);
                    // A message the lost agent never showed it got goes to its successor.
                    let unseen = self.in_flight.take();
                    let resend = unseen.is_some();
                    if let Some(turn) = unseen {
                        queue.push_front(turn);
                    }
                    let abandoned = std::mem::take(&mut self.abandoning);
                    match self.replace_agent(agent, Replace::Resume).await {
                        Ok(new_agent) if abandoned => agent = new_agent,
                        Ok(new_agent) => {
                            agent = new_agent;
                            let note = if self.resumed_empty && !resend && !was_busy {
                                "⚠️ The connection to Claude was lost before the conversation began; Claude was started again and nothing was lost."
                            } else if resend {
                                "⚠️ The connection to Claude was lost before it answered; Claude was restarted, the conversation resumed, and your message was sent again."
                            } else if was_busy {
                                "⚠️ The connection to Claude was lost in the middle of an answer; Claude was restarted and the conversation resumed. The interrupted answer may be incomplete: ask again if needed."
                            } else {
                                "⚠️ The connection to Claude was lost; Claude was restarted and the conversation resumed."
                            };
                            self.manager.say(&self.plan.session, note).await;
                        }
                        Err(e) => {
                            warn!(session = %self.plan.session.id, %why, error = %e, "cannot resume the agent");
                            match self.dormant(rx, queue, waiters, &e).await {
                                Ok(new_agent) => agent = new_agent,
                                Err(ending) => return ending,
                            }
                        }
                    }
                }
            }
            if !self.busy && self.pending != Pending::None {
                let how = match std::mem::replace(&mut self.pending, Pending::None) {
                    Pending::Clear => Replace::Clear,
                    _ => Replace::Restart,
                };
                match self.replace_agent(agent, how).await {
                    Ok(new_agent) => agent = new_agent,
                    Err(e) => match self.dormant(rx, queue, waiters, &e).await {
                        Ok(new_agent) => agent = new_agent,
                        Err(ending) => return ending,
                    },
                }
            }
            // An orchestrator compacts between turns, before its next message.
            if !self.busy
                && self.plan.session.kind == SessionKind::Orchestrator
                && self.auto_compact.due(tokio::time::Instant::now())
            {
                info!(session = %self.plan.session.id, "auto-compacting the orchestrator");
                queue.push_front(Turn::injected("/compact"));
            }
            self.next_turn(&mut agent, queue).await;
        }
    }

    /// Brings the session up, queueing what arrives meanwhile.
    async fn start_up(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        queue: &mut VecDeque<Turn>,
        waiters: &mut Vec<oneshot::Sender<()>>,
    ) -> Result<Agent, Ending> {
        let result = {
            let bring_up = self.bring_up();
            tokio::pin!(bring_up);
            loop {
                tokio::select! {
                    result = &mut bring_up => break result,
                    request = rx.recv() => match while_bringing_up(request, queue, waiters, |position| Delivery::Queued { position }, "Claude is still starting; try again once it says it is ready") {
                        Waiting::Goes => {}
                        Waiting::Stopped => break Err(StartError::Stopped),
                        // The bot stops while this session starts: `recover` decides at the next start.
                        Waiting::Detached => return Err(Ending::Detach),
                    }
                }
            }
        };
        result.map_err(|e| Ending::End(e.end_reason(), Some(e.to_string())))
    }

    /// Clone, container and agent (or, when resuming, only the agent), shown in the progress
    /// post (or, when resuming, in the thread).
    async fn bring_up(&mut self) -> Result<Agent, StartError> {
        let manager = Arc::clone(&self.manager);
        let mut progress = self
            .progress
            .clone()
            .map(|post| Progress::new(Arc::clone(&manager.chat), post));
        let result = match manager.prepare(&mut self.plan, progress.as_mut()).await {
            Ok(()) => {
                if let Some(p) = progress.as_mut() {
                    p.step("Starting Claude").await;
                }
                self.spawn_agent(false).await.map_err(StartError::Agent)
            }
            Err(e) => Err(e),
        };
        // The state is Idle before the thread says Ready: whoever reads the session after
        // seeing that post (`!status`, the console, the reconciler) sees it ready too.
        if result.is_ok() {
            if let Err(e) = manager
                .store
                .set_session_state(&self.plan.session.id, SessionState::Idle)
                .await
            {
                warn!(session = %self.plan.session.id, error = %e, "cannot record the session as ready");
            }
            info!(session = %self.plan.session.id, "session ready");
        }
        match (&result, progress.as_mut()) {
            (Ok(_), Some(p)) => p.ready("Ready: Claude is listening in this thread.").await,
            (Ok(_), None) => {
                manager
                    .say(&self.plan.session, "🔄 The bot restarted; this session continues where it was (conversation resumed).")
                    .await
            }
            (Err(e), Some(p)) => p.failed(&e.to_string(), &e.hint()).await,
            (Err(e), None) => manager.say(&self.plan.session, &e.report()).await,
        }
        result
    }

    /// Starts the agent process. With `fresh`, a new conversation id is chosen (and stored)
    /// first; otherwise the stored conversation is resumed (or started, the first time). A
    /// conversation the CLI has no record of (the agent was lost before its first turn was
    /// written) is started under the same id instead: nothing of it existed to lose.
    async fn spawn_agent(&mut self, fresh: bool) -> Result<Agent, AgentError> {
        self.resumed_empty = false;
        let session = &mut self.plan.session;
        let (conversation, resume) = match (&session.agent_session_id, fresh) {
            (Some(existing), false) => (existing.clone(), true),
            _ => (uuid::Uuid::new_v4().to_string(), false),
        };
        if !resume {
            self.manager
                .store
                .set_agent_session_id(&session.id, Some(&conversation))
                .await
                .map_err(AgentError::Store)?;
            session.agent_session_id = Some(conversation.clone());
            // A new conversation's running total starts from zero.
            self.last_total_cost = 0.0;
        }
        let started = Agent::start(
            &self.manager,
            &self.plan.session,
            self.plan.container.as_ref(),
            &conversation,
            resume,
        )
        .await;
        match started {
            Err(e) if resume && e.is_no_conversation() => {
                info!(session = %self.plan.session.id, %conversation, "the conversation had no turn yet: starting it under the same id");
                self.last_total_cost = 0.0;
                self.resumed_empty = true;
                Agent::start(
                    &self.manager,
                    &self.plan.session,
                    self.plan.container.as_ref(),
                    &conversation,
                    false,
                )
                .await
            }
            other => other,
        }
    }

    /// The session without an agent, because starting one (resuming, `restart`, `clear`)
    /// failed with `error`: the thread is told why (the CLI's own words when it said any), and
    /// the session stays, holding what is sent meanwhile, until `restart` or `clear` starts an
    /// agent (returned) or a stop or detach ends it.
    async fn dormant(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        queue: &mut VecDeque<Turn>,
        waiters: &mut Vec<oneshot::Sender<()>>,
        error: &AgentError,
    ) -> Result<Agent, Ending> {
        self.busy = false;
        self.in_flight = None;
        self.interrupted_at = None;
        self.pending = Pending::None;
        let session = self.plan.session.clone();
        self.manager
            .say(&session, &format!("❌ Claude could not be started again: {error}. The session is kept: `!restart` tries again on the same conversation, `!clear` starts a new one, `!stop` ends it. Messages sent meanwhile wait for Claude."))
            .await;
        loop {
            if self.manager.gate.opened().await.is_err() {
                return Err(Ending::Detach);
            }
            let (fresh, reply) = match self.recv_or_too_old(rx).await? {
                None => return Err(Ending::Detach),
                Some(Request::Shutdown { reply }) => {
                    waiters.push(reply);
                    return Err(Ending::End(EndReason::UserRequested, None));
                }
                Some(Request::Message { turn, reply }) => {
                    let _ = reply.send(enqueue(queue, turn, |position| Delivery::Queued {
                        position,
                    }));
                    continue;
                }
                Some(Request::Compact { reply }) => {
                    let _ = reply.send(());
                    continue;
                }
                Some(Request::Interrupt { reply }) => {
                    let _ = reply.send(false);
                    continue;
                }
                // The agent that asked is gone.
                Some(Request::Permission { reply, .. }) => {
                    let _ = reply.send(());
                    continue;
                }
                Some(Request::Release { reply }) => {
                    self.held = false;
                    let _ = reply.send(());
                    continue;
                }
                // The next agent starts in this mode.
                Some(Request::SetMode { mode, reply }) => {
                    self.plan.session.permission_mode = Some(mode.as_cli().to_owned());
                    let recorded = self
                        .manager
                        .store
                        .set_session_permission_mode(&self.plan.session.id, Some(mode.as_cli()))
                        .await
                        .map_err(|e| e.to_string());
                    let _ = reply.send(recorded);
                    continue;
                }
                Some(Request::Restart { reply }) => (false, reply),
                Some(Request::Clear { reply }) => (true, reply),
            };
            let _ = reply.send(());
            match self.spawn_agent(fresh).await {
                Ok(agent) => {
                    let note = if fresh {
                        "🧹 Started a fresh conversation."
                    } else {
                        "🔄 Restarted Claude; the conversation continues."
                    };
                    self.manager.say(&session, note).await;
                    return Ok(agent);
                }
                Err(e) => {
                    warn!(session = %session.id, error = %e, "cannot start the agent");
                    self.manager
                        .say(&session, &format!("❌ Claude could not be started: {e}. `!restart` tries again, `!clear` starts a new conversation, `!stop` ends the session."))
                        .await;
                }
            }
        }
    }

    /// The next request, or the session's end when it grows older than
    /// `SM_SESSION_MAX_AGE_SECS` first.
    async fn recv_or_too_old(
        &self,
        rx: &mut mpsc::Receiver<Request>,
    ) -> Result<Option<Request>, Ending> {
        tokio::select! {
            request = rx.recv() => Ok(request),
            () = sleep_until_or_never(self.max_age_deadline()) => Err(self.too_old().await),
        }
    }

    /// When the session hibernates (`SM_SESSION_IDLE_SECS` after the last activity), if
    /// nothing holds it awake: a running turn, queued messages, a pending `restart`/`clear`,
    /// markers not yet handed over, a denial waiting for its reason.
    fn idle_deadline(&self, queue: &VecDeque<Turn>) -> Option<tokio::time::Instant> {
        let idle = self.manager.config.idle_of(&self.plan.session);
        if idle.is_zero()
            || self.busy
            || !queue.is_empty()
            || self.pending != Pending::None
            || !self.outbox.is_empty()
            || self.deny_reason.is_some()
        {
            return None;
        }
        Some(self.last_active + idle)
    }

    /// When the session reaches `SM_SESSION_MAX_AGE_SECS` (counted from its creation), if
    /// there is a limit.
    fn max_age_deadline(&self) -> Option<tokio::time::Instant> {
        max_age_deadline(
            self.plan.session.created_at,
            self.manager.config.session_max_age,
            now_ms(),
            tokio::time::Instant::now(),
        )
    }

    /// Tells the thread the session is too old; the ending that follows.
    async fn too_old(&self) -> Ending {
        let limit =
            crate::dispatch::human_duration(duration_ms(self.manager.config.session_max_age));
        info!(session = %self.plan.session.id, %limit, "the session reached its maximum age");
        self.manager
            .say(
                &self.plan.session,
                &format!("⌛ This session reached its maximum age of {limit} (SM_SESSION_MAX_AGE_SECS) and is ended. Start a new one to go on."),
            )
            .await;
        Ending::End(
            EndReason::MaxAge,
            Some(format!("older than {limit} (SM_SESSION_MAX_AGE_SECS)")),
        )
    }

    /// Hibernation: with `fall_asleep`, the container is stopped (not removed: the workspace
    /// and Claude Code's state stay), the state stored and the thread told (the agent is
    /// already closed); without, the session was hibernating when the bot started. Then waits
    /// for a message (or `restart`, `clear`, `/compact`), keeping what is queued, and wakes the
    /// session for it: the agent it returns has the conversation resumed (a new one for
    /// `clear`), and the queue delivers the message. A stop, a detach or the maximum age ends
    /// it; a wake that fails for a cause that may pass (the VM unreachable) leaves it
    /// hibernating, told in the thread.
    async fn hibernate(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        queue: &mut VecDeque<Turn>,
        waiters: &mut Vec<oneshot::Sender<()>>,
        fall_asleep: bool,
    ) -> Result<Agent, Ending> {
        self.busy = false;
        self.in_flight = None;
        self.interrupted_at = None;
        self.abandoning = false;
        self.pending = Pending::None;
        if fall_asleep {
            self.close_questions("Claude hibernates, and asks again if it needs to once woken");
            self.fall_asleep().await;
        }
        loop {
            if self.manager.gate.opened().await.is_err() {
                return Err(Ending::Detach);
            }
            let gate = self.manager.gate.clone();
            let request = tokio::select! {
                () = gate.closed() => continue,
                request = self.recv_or_too_old(rx) => request?,
            };
            let fresh = match request {
                None => return Err(Ending::Detach),
                Some(Request::Shutdown { reply }) => {
                    waiters.push(reply);
                    return Err(Ending::End(EndReason::UserRequested, None));
                }
                Some(Request::Message { turn, reply }) => {
                    // The agent gets it as soon as it is awake.
                    let _ = reply.send(enqueue(queue, turn, |_| Delivery::Delivered));
                    false
                }
                Some(Request::Compact { reply }) => {
                    let _ = reply.send(());
                    queue.push_back(Turn::injected("/compact"));
                    false
                }
                Some(Request::Interrupt { reply }) => {
                    let _ = reply.send(false);
                    continue;
                }
                Some(Request::Restart { reply }) => {
                    let _ = reply.send(());
                    false
                }
                Some(Request::Clear { reply }) => {
                    let _ = reply.send(());
                    true
                }
                // The agent that asked is gone.
                Some(Request::Permission { reply, .. }) => {
                    let _ = reply.send(());
                    continue;
                }
                // The budget is checked again when the woken agent is sent a turn.
                Some(Request::Release { reply }) => {
                    self.held = false;
                    let _ = reply.send(());
                    continue;
                }
                // The woken agent starts in this mode.
                Some(Request::SetMode { mode, reply }) => {
                    self.plan.session.permission_mode = Some(mode.as_cli().to_owned());
                    let recorded = self
                        .manager
                        .store
                        .set_session_permission_mode(&self.plan.session.id, Some(mode.as_cli()))
                        .await
                        .map_err(|e| e.to_string());
                    let _ = reply.send(recorded);
                    continue;
                }
            };
            if let Some(agent) = self.wake(rx, queue, waiters, fresh).await? {
                return Ok(agent);
            }
        }
    }

    /// Stops the container (unless another live session uses it), stores the state and tells
    /// the thread.
    async fn fall_asleep(&mut self) {
        let session = self.plan.session.clone();
        let idle = crate::dispatch::human_duration(duration_ms(
            self.manager.config.idle_of(&self.plan.session),
        ));
        info!(session = %session.id, %idle, "hibernating");
        // Recorded first: the reconciler starts a live session's stopped container unless it
        // knows the session hibernates.
        let at = now_ms();
        if let Err(e) = self.manager.store.set_hibernating(&session.id, at).await {
            warn!(session = %session.id, error = %e, "cannot record the hibernation; after a bot restart the session is woken at once");
        }
        self.plan.session.hibernated_at = Some(at);
        let mut stopped = false;
        if let Some(container) = &self.plan.container {
            let store = &self.manager.store;
            match store
                .container_users(&container.id, Some(&session.id))
                .await
            {
                Ok(0) => {
                    match crate::runtime::devcontainer::stop(
                        &self.manager.ssh,
                        &self.manager.config.containers.runtime,
                        &container.id,
                    )
                    .await
                    {
                        Ok(()) => stopped = true,
                        Err(e) => {
                            warn!(session = %session.id, error = %e, "cannot stop the container of a hibernating session")
                        }
                    }
                }
                Ok(_) => {
                    info!(session = %session.id, "another session uses the container: it keeps running")
                }
                Err(e) => {
                    warn!(session = %session.id, error = %e, "cannot check the container's users; it keeps running")
                }
            }
        }
        let container = if stopped {
            "the container is stopped"
        } else {
            "Claude is closed"
        };
        self.manager
            .say(
                &session,
                &format!("💤 Hibernating after {idle} without a message: {container}. The next message wakes it."),
            )
            .await;
    }

    /// Wakes a hibernating session: container started, agent started (resuming the
    /// conversation, or a new one with `fresh`), the time it took shown in a progress post.
    /// What arrives meanwhile is queued. `Ok(None)`: it could not be woken now and still
    /// hibernates.
    async fn wake(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        queue: &mut VecDeque<Turn>,
        waiters: &mut Vec<oneshot::Sender<()>>,
        fresh: bool,
    ) -> Result<Option<Agent>, Ending> {
        let session = self.plan.session.clone();
        let began = tokio::time::Instant::now();
        info!(session = %session.id, fresh, "waking up");
        let post = match self
            .manager
            .chat
            .post(
                &session.channel_id,
                Some(&session.thread_id),
                "⏰ Waking up…",
            )
            .await
        {
            Ok(post) => Some(post),
            Err(e) => {
                warn!(session = %session.id, error = %e, "cannot post in the session thread");
                None
            }
        };
        let result = {
            let waking = self.wake_up(fresh);
            tokio::pin!(waking);
            loop {
                tokio::select! {
                    result = &mut waking => break result,
                    // A message is as good as delivered: the agent gets it once awake.
                    request = rx.recv() => match while_bringing_up(request, queue, waiters, |_| Delivery::Delivered, "Claude is waking up; try again once it says it is awake") {
                        Waiting::Goes => {}
                        Waiting::Stopped => break Err(StartError::Stopped),
                        // The bot stops: the session still hibernates (stored), and its
                        // message is handed out again after the restart.
                        Waiting::Detached => return Err(Ending::Detach),
                    }
                }
            }
        };
        // Errors quote the repository or the VM: what is shown is made inert.
        let show = |text: String| {
            let chat = Arc::clone(&self.manager.chat);
            let post = post.clone();
            async move {
                if let Some(post) = post {
                    let text = crate::chat::render::neutralize(&text);
                    if let Err(e) = chat.update(&post, &text).await {
                        warn!(error = %e, "cannot update the wake-up post");
                    }
                }
            }
        };
        match result {
            Ok(agent) => {
                let took = began.elapsed().as_secs_f64();
                let _ = self
                    .manager
                    .store
                    .set_session_state(&session.id, SessionState::Idle)
                    .await;
                self.plan.session.hibernated_at = None;
                let how = if fresh { " (a new conversation)" } else { "" };
                info!(session = %session.id, took_secs = took, "awake");
                show(format!("⏰ Waking up… ✅ awake in {took:.1} s{how}.")).await;
                Ok(Some(agent))
            }
            Err(StartError::Stopped) => Err(Ending::End(EndReason::UserRequested, None)),
            Err(StartError::Agent(e)) => {
                // The container runs again; the agent does not.
                let _ = self
                    .manager
                    .store
                    .set_session_state(&session.id, SessionState::Idle)
                    .await;
                self.plan.session.hibernated_at = None;
                show(format!("⏰ Waking up… ❌ {e}")).await;
                self.dormant(rx, queue, waiters, &e).await.map(Some)
            }
            Err(e @ StartError::ContainerGone { .. }) => {
                show(format!("⏰ Waking up… {}", e.report())).await;
                Err(Ending::End(e.end_reason(), Some(e.to_string())))
            }
            Err(e) => {
                warn!(session = %session.id, error = %e, "cannot wake the session");
                show(format!("⏰ Waking up… ❌ {e}. The session still hibernates: the next message tries again, `!stop` ends it.")).await;
                Ok(None)
            }
        }
    }

    /// The container (checked and started, as after a bot restart) and the agent.
    async fn wake_up(&mut self, fresh: bool) -> Result<Agent, StartError> {
        let resume = std::mem::replace(&mut self.plan.resume, true);
        let prepared = self.manager.prepare(&mut self.plan, None).await;
        self.plan.resume = resume;
        prepared?;
        self.spawn_agent(fresh).await.map_err(StartError::Agent)
    }

    /// Replaces the agent process: a lost one quietly, or after a turn for `restart`/`clear`
    /// (told in the thread).
    async fn replace_agent(&mut self, old: Agent, how: Replace) -> Result<Agent, AgentError> {
        old.close().await;
        self.close_questions("Claude was restarted, and the new process asks again if it needs to");
        if let (Replace::Resume, Some(container)) = (how, &self.plan.container) {
            // The agent may be lost because its container was stopped.
            if let Err(e) = self.manager.revive_container(&container.id).await {
                warn!(session = %self.plan.session.id, error = %e, "cannot check the container before resuming");
            }
        }
        let agent = self.spawn_agent(how == Replace::Clear).await?;
        let note = match how {
            Replace::Resume => return Ok(agent),
            Replace::Restart => "🔄 Restarted Claude; the conversation continues.",
            Replace::Clear => "🧹 Started a fresh conversation.",
        };
        self.manager.say(&self.plan.session, note).await;
        Ok(agent)
    }

    async fn on_request(
        &mut self,
        request: Option<Request>,
        agent: &mut Agent,
        queue: &mut VecDeque<Turn>,
        waiters: &mut Vec<oneshot::Sender<()>>,
    ) -> Step {
        match request {
            None => Step::Detach,
            Some(Request::Shutdown { reply }) => {
                waiters.push(reply);
                Step::Exit(EndReason::UserRequested, None)
            }
            Some(Request::Message { turn, reply })
                if turn.inbound.is_some() && self.deny_reason.is_some() =>
            {
                // The reply right after a Deny is the reason the agent gets.
                if let Some((request_id, _, by)) = self.deny_reason.take() {
                    let answer = PermissionAnswer::Deny {
                        message: format!("Denied by {by}: {}", turn.text),
                    };
                    self.answer_permission(agent, &request_id, &answer).await;
                    if let Some((platform, post_id)) = &turn.inbound {
                        if let Err(e) = self
                            .manager
                            .store
                            .mark_inbound_handled(*platform, post_id)
                            .await
                        {
                            warn!(error = %e, "cannot mark a message handled");
                        }
                    }
                }
                let _ = reply.send(Delivery::Delivered);
                Step::Continue
            }
            Some(Request::Permission {
                request_id,
                answer,
                reply,
            }) => {
                let _ = reply.send(());
                match answer {
                    PermissionAnswer::DenyAwaitingReason { by, wait } => {
                        self.deny_reason =
                            Some((request_id, tokio::time::Instant::now() + wait, by));
                    }
                    answer => self.answer_permission(agent, &request_id, &answer).await,
                }
                Step::Continue
            }
            Some(Request::SetMode { mode, reply }) => {
                let id = format!("mode-{}", uuid::Uuid::new_v4().simple());
                let told = agent
                    .write(&stream_json::set_permission_mode(&id, mode.as_cli()))
                    .await
                    .map_err(|e| e.to_string());
                if told.is_ok() {
                    self.plan.session.permission_mode = Some(mode.as_cli().to_owned());
                    if let Err(e) = self
                        .manager
                        .store
                        .set_session_permission_mode(&self.plan.session.id, Some(mode.as_cli()))
                        .await
                    {
                        warn!(error = %e, "cannot record the permission mode");
                    }
                }
                let _ = reply.send(told);
                Step::Continue
            }
            Some(Request::Release { reply }) => {
                let _ = reply.send(());
                self.held = false;
                self.next_turn(agent, queue).await;
                Step::Continue
            }
            Some(Request::Message { turn, reply }) => {
                if self.busy || !queue.is_empty() || self.held {
                    let _ = reply.send(enqueue(queue, turn, |position| Delivery::Queued {
                        position,
                    }));
                } else {
                    let _ = reply.send(Delivery::Delivered);
                    self.send_turn(agent, queue, turn).await;
                }
                Step::Continue
            }
            Some(Request::Compact { reply }) => {
                let _ = reply.send(());
                if self.busy || !queue.is_empty() {
                    queue.push_back(Turn::injected("/compact"));
                } else {
                    self.send_turn(agent, queue, Turn::injected("/compact"))
                        .await;
                }
                Step::Continue
            }
            Some(Request::Clear { reply }) => {
                let _ = reply.send(());
                self.pending = Pending::Clear;
                // A hung turn would never end: interrupt it, then clear.
                self.interrupt(agent).await;
                Step::Continue
            }
            Some(Request::Restart { reply }) => {
                let _ = reply.send(());
                if self.pending != Pending::Clear {
                    self.pending = Pending::Restart;
                }
                self.interrupt(agent).await;
                Step::Continue
            }
            Some(Request::Interrupt { reply }) => {
                let _ = reply.send(self.interrupt(agent).await);
                Step::Continue
            }
        }
    }

    /// Writes the answer to permission question `request_id`.
    async fn answer_permission(
        &mut self,
        agent: &mut Agent,
        request_id: &str,
        answer: &PermissionAnswer,
    ) {
        if let Err(e) = agent
            .write(&stream_json::control_response(
                request_id,
                &answer.response(),
            ))
            .await
        {
            warn!(session = %self.plan.session.id, error = %e, "cannot answer the agent's permission question");
        }
    }

    /// Tells the permission flow that this agent process is gone: its open questions close.
    fn close_questions(&mut self, why: &str) {
        self.deny_reason = None;
        let event = PermissionEvent::Closed {
            session_id: self.plan.session.id.clone(),
            why: why.to_owned(),
        };
        if self.manager.permissions.try_send(event).is_err() {
            debug!(session = %self.plan.session.id, "the permission flow is not running");
        }
    }

    /// Asks the agent to stop the turn in flight (the CLI answers with a `result` of subtype
    /// `error_during_execution`); `false` when no turn runs. Asking twice sends one request.
    async fn interrupt(&mut self, agent: &mut Agent) -> bool {
        if !self.busy {
            return false;
        }
        if self.interrupted_at.is_none() {
            let id = format!("int-{}", uuid::Uuid::new_v4().simple());
            if let Err(e) = agent
                .write(&stream_json::control_request(&id, "interrupt"))
                .await
            {
                warn!(session = %self.plan.session.id, error = %e, "cannot ask the agent to interrupt");
            }
            self.interrupted_at = Some(tokio::time::Instant::now());
        }
        true
    }

    /// When the running turn is due to be interrupted (`SM_TURN_TIMEOUT_SECS`), or abandoned
    /// (an interrupt it did not answer within [`INTERRUPT_GRACE`]).
    fn turn_deadline(&self) -> Option<tokio::time::Instant> {
        if !self.busy {
            return None;
        }
        match (self.interrupted_at, self.turn_started) {
            (Some(at), _) => Some(at + INTERRUPT_GRACE),
            (None, Some(started)) => Some(started + self.manager.config.turn_timeout),
            (None, None) => None,
        }
    }

    /// Between turns: sends the next queued message, if any.
    async fn next_turn(&mut self, agent: &mut Agent, queue: &mut VecDeque<Turn>) {
        if !self.busy {
            if let Some(next) = queue.pop_front() {
                self.send_turn(agent, queue, next).await;
            }
        }
    }

    /// Writes a user turn; a turn runs afterwards. When the agent's input is closed (its
    /// process or SSH channel died), the message goes back to the front of `queue`: the end of
    /// the agent's output follows, the conversation is resumed in a new process, and the queue
    /// delivers it there. Nothing is dropped.
    async fn send_turn(&mut self, agent: &mut Agent, queue: &mut VecDeque<Turn>, turn: Turn) {
        if !self.manager.gate.is_open() {
            // Suspended: it waits, first in line, until this instance acts again.
            queue.push_front(turn);
            return;
        }
        let limits = self.manager.config.budgets;
        if let Some(state) = budget::over(&self.manager.store, limits, &self.plan.session).await {
            // Over a cap: it waits, first in line, until the budget is raised.
            queue.push_front(turn);
            if !self.held {
                self.held = true;
                let event = BudgetEvent::Reached {
                    session: Box::new(self.plan.session.clone()),
                    state: Box::new(state),
                };
                if self.manager.budgets.try_send(event).is_err() {
                    warn!(session = %self.plan.session.id, "the budget flow cannot take a held session");
                }
            }
            return;
        }
        self.held = false;
        let line = stream_json::user_turn(&turn.text);
        let is_compact = turn.text == "/compact";
        self.in_flight = None;
        if let Err(e) = agent.write(&line).await {
            warn!(session = %self.plan.session.id, error = %e, "cannot write to the agent; the message waits for the agent to be resumed");
            queue.push_front(turn);
            return;
        }
        self.busy = true;
        self.turn_started = Some(tokio::time::Instant::now());
        self.interrupted_at = None;
        let store = &self.manager.store;
        // The agent has it: the chat message it came from is handled.
        if let Some((platform, post_id)) = &turn.inbound {
            if let Err(e) = store.mark_inbound_handled(*platform, post_id).await {
                warn!(session = %self.plan.session.id, error = %e, post = %post_id, "cannot mark a message handled; it may be sent again after a restart");
            }
        }
        self.in_flight = Some(turn);
        if !is_compact {
            self.auto_compact.on_message();
        }
        let usage = UsageDelta {
            messages: 1,
            ..UsageDelta::default()
        };
        if let Err(e) = store
            .add_usage(&self.plan.session.id, &usage, now_ms())
            .await
        {
            warn!(error = %e, "cannot count a message");
        }
        let _ = store
            .set_session_state(&self.plan.session.id, SessionState::Running)
            .await;
    }

    /// The cost of the turn that just ended: the CLI's per-turn figure when it gives one;
    /// otherwise the growth of its running total for the conversation (which keeps counting
    /// across `--resume`, so it is reset only for a new conversation).
    fn cost_delta(&mut self, turn: Option<f64>, total: Option<f64>) -> f64 {
        let from_total = total.map(|t| {
            let last = self.last_total_cost;
            self.last_total_cost = t;
            if t >= last {
                t - last
            } else {
                t
            }
        });
        turn.or(from_total).unwrap_or(0.0)
    }

    async fn add_usage(&self, delta: &UsageDelta) {
        if let Err(e) = self
            .manager
            .store
            .add_usage(&self.plan.session.id, delta, now_ms())
            .await
        {
            debug!(session = %self.plan.session.id, error = %e, "cannot record usage");
        }
    }

    /// Handles one stdout line.
    async fn on_line(&mut self, line: &str, output: &mpsc::Sender<TurnInput>) {
        let event = match stream_json::decode_line(line) {
            Ok(event) => event,
            Err(e) => {
                debug!(session = %self.plan.session.id, error = %e, "agent printed a line that is not stream-json");
                return;
            }
        };
        if matches!(
            event,
            AgentEvent::Assistant { .. }
                | AgentEvent::Result(_)
                | AgentEvent::ToolResults { .. }
                | AgentEvent::CompactBoundary
        ) {
            self.in_flight = None; // the agent has the message
        }
        match event {
            AgentEvent::Assistant {
                blocks,
                usage,
                parent_tool_use_id,
                ..
            } => {
                if let Some(usage) = usage.filter(|_| parent_tool_use_id.is_none()) {
                    self.add_usage(&UsageDelta {
                        context_tokens: Some(usage.context_tokens()),
                        ..UsageDelta::default()
                    })
                    .await;
                }
                for block in blocks {
                    match block {
                        AssistantBlock::Text(mut text) if parent_tool_use_id.is_none() => {
                            if !text.ends_with('\n') {
                                text.push('\n');
                            }
                            for event in self.scanner.feed(&text) {
                                self.scan_event(event, output).await;
                            }
                        }
                        AssistantBlock::ToolUse { id, name, input } => {
                            // The CLI may announce a call before its input: show it once.
                            let empty = input.as_object().is_some_and(serde_json::Map::is_empty);
                            if !empty && self.seen_tools.insert(id) {
                                let _ = output.send(TurnInput::ToolUse { name, input }).await;
                            }
                        }
                        _ => {}
                    }
                }
            }
            AgentEvent::Result(result) => {
                for event in self.scanner.finish() {
                    self.scan_event(event, output).await;
                }
                self.scanner.reset();
                let _ = output.send(TurnInput::EndTurn).await;
                let cost_usd = self.cost_delta(result.turn_cost_usd, result.total_cost_usd);
                self.add_usage(&UsageDelta {
                    input_tokens: result.usage.input_tokens
                        + result.usage.cache_creation_input_tokens
                        + result.usage.cache_read_input_tokens,
                    output_tokens: result.usage.output_tokens,
                    cost_usd,
                    ..UsageDelta::default()
                })
                .await;
                let _ = self
                    .manager
                    .store
                    .set_session_state(&self.plan.session.id, SessionState::Idle)
                    .await;
                if self.interrupted_at.take().is_some() {
                    self.manager
                        .say(&self.plan.session, "⏹️ Claude's turn was interrupted.")
                        .await;
                } else if result.is_error {
                    let why = crate::chat::render::neutralize(
                        &result.result.unwrap_or_else(|| result.subtype.clone()),
                    );
                    self.manager
                        .say(
                            &self.plan.session,
                            &format!("⚠️ Claude's turn ended with an error: {why}"),
                        )
                        .await;
                }
                self.busy = false;
                self.seen_tools.clear();
            }
            AgentEvent::CompactBoundary => {
                self.add_usage(&UsageDelta {
                    compactions: 1,
                    ..UsageDelta::default()
                })
                .await;
            }
            AgentEvent::Init { session_id, .. } => {
                debug!(session = %self.plan.session.id, conversation = %session_id, "agent initialised");
            }
            AgentEvent::ControlRequest {
                request_id,
                subtype,
                request,
            } if subtype == "can_use_tool" => {
                let ask = PermissionAsk {
                    session: self.plan.session.clone(),
                    request_id,
                    tool_name: request["tool_name"].as_str().unwrap_or("a tool").to_owned(),
                    input: request
                        .get("input")
                        .cloned()
                        .unwrap_or(serde_json::Value::Null),
                    suggestions: request
                        .get("permission_suggestions")
                        .cloned()
                        .unwrap_or(serde_json::Value::Null),
                };
                if let Err(e) = self
                    .manager
                    .permissions
                    .try_send(PermissionEvent::Ask(Box::new(ask)))
                {
                    let ask = match e {
                        mpsc::error::TrySendError::Full(PermissionEvent::Ask(ask))
                        | mpsc::error::TrySendError::Closed(PermissionEvent::Ask(ask)) => ask,
                        _ => return,
                    };
                    warn!(session = %self.plan.session.id, "the permission flow cannot take a question; denying it");
                    self.pending_denials.push(ask.request_id);
                }
            }
            AgentEvent::ControlRequest {
                request_id,
                subtype,
                ..
            } => {
                debug!(session = %self.plan.session.id, %subtype, %request_id, "unexpected control request from the agent");
            }
            AgentEvent::Other { kind } => {
                debug!(session = %self.plan.session.id, %kind, "agent event not handled");
            }
            AgentEvent::ToolResults { .. } | AgentEvent::ControlResponse { .. } => {}
        }
    }

    async fn scan_event(&mut self, event: ScanEvent, output: &mpsc::Sender<TurnInput>) {
        match event {
            ScanEvent::Text(text) => {
                let _ = output.send(TurnInput::Text(text)).await;
            }
            ScanEvent::Marker(marker) => self.outbox.push_back(MarkerEvent {
                session: self.plan.session.clone(),
                marker,
            }),
        }
    }
}

/// What a request received while the agent is brought up (started or woken) leaves to do.
enum Waiting {
    /// Answered; the bring-up goes on.
    Goes,
    /// `!stop`: the bring-up is abandoned (its waiter was kept).
    Stopped,
    /// The bot stops: the session is left for the next start.
    Detached,
}

/// Answers `request` while the agent is brought up: a message is queued (answered with
/// `taken(position)`, see [`enqueue`]); what needs a running agent is answered at once
/// (`compact`, `clear`, `restart` and a release have nothing to do, an interrupt interrupts
/// nothing, a permission answer has no question, a mode change gets `not_yet`); `!stop` keeps
/// its waiter in `waiters`.
fn while_bringing_up(
    request: Option<Request>,
    queue: &mut VecDeque<Turn>,
    waiters: &mut Vec<oneshot::Sender<()>>,
    taken: impl FnOnce(usize) -> Delivery,
    not_yet: &str,
) -> Waiting {
    match request {
        Some(Request::Message { turn, reply }) => {
            let _ = reply.send(enqueue(queue, turn, taken));
        }
        Some(Request::Shutdown { reply }) => {
            waiters.push(reply);
            return Waiting::Stopped;
        }
        Some(
            Request::Compact { reply }
            | Request::Clear { reply }
            | Request::Restart { reply }
            | Request::Permission { reply, .. }
            | Request::Release { reply },
        ) => {
            let _ = reply.send(());
        }
        Some(Request::Interrupt { reply }) => {
            let _ = reply.send(false);
        }
        Some(Request::SetMode { reply, .. }) => {
            let _ = reply.send(Err(not_yet.into()));
        }
        None => return Waiting::Detached,
    }
    Waiting::Goes
}

/// Queues `turn` for the agent and says how: `taken(position)` (1 = next) while the session
/// holds fewer than [`MAX_QUEUED`] messages, else [`Delivery::Refused`] and the turn is dropped
/// here (its sender is told by whoever asked; the message stays recorded as handled).
fn enqueue(
    queue: &mut VecDeque<Turn>,
    turn: Turn,
    taken: impl FnOnce(usize) -> Delivery,
) -> Delivery {
    if queue.len() >= MAX_QUEUED {
        return Delivery::Refused {
            waiting: queue.len(),
        };
    }
    queue.push_back(turn);
    taken(queue.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_the_next_message_and_keeps_what_it_holds() {
        let mut queue = VecDeque::new();
        for n in 1..=MAX_QUEUED {
            let taken = enqueue(&mut queue, Turn::injected(format!("m{n}")), |position| {
                Delivery::Queued { position }
            });
            assert_eq!(taken, Delivery::Queued { position: n });
        }
        let refused = enqueue(&mut queue, Turn::injected("one more"), |_| {
            Delivery::Delivered
        });
        assert_eq!(
            refused,
            Delivery::Refused {
                waiting: MAX_QUEUED
            }
        );
        assert_eq!(queue.len(), MAX_QUEUED, "nothing dropped, nothing added");
        assert_eq!(queue.front().map(|t| t.text.as_str()), Some("m1"));
        assert_eq!(
            queue.back().map(|t| t.text.as_str()),
            Some(format!("m{MAX_QUEUED}").as_str())
        );
    }

    #[test]
    fn the_max_age_deadline_counts_from_creation_on_the_wall_clock() {
        let now = tokio::time::Instant::now();
        let age = Duration::from_secs(10);
        assert_eq!(max_age_deadline(1_000, Duration::ZERO, 5_000, now), None);
        assert_eq!(
            max_age_deadline(1_000, age, 5_000, now),
            Some(now + Duration::from_secs(6)),
            "created 4 s ago: 6 s left"
        );
        assert_eq!(
            max_age_deadline(1_000, age, 60_000, now),
            Some(now),
            "already older: now"
        );
        assert!(
            max_age_deadline(i64::MAX - 5, age, 0, now).is_none_or(|at| at > now),
            "no overflow"
        );
    }
}
