//! One session's actor: it owns the agent process and everything that talks to it.
//!
//! The actor brings the session up (or resumes it after a bot restart), then loops over three
//! inputs: requests from its [`SessionHandle`], lines from the agent's stdout (read all the
//! time, not only during a turn), and the agent's exit. User messages that arrive during a turn
//! (or while the session is still starting) are queued in order and sent when the turn ends;
//! `clear` and `restart` wait for the turn to end too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{Manager, SessionPlan};
use crate::agent::markers::{MarkerScanner, MarkerSet, ScanEvent};
use crate::agent::stream_json::{self, AgentEvent, AssistantBlock};
use crate::chat::progress::Progress;
use crate::chat::stream::{spawn_thread_output, TurnInput};
use crate::chat::PostRef;
use crate::dispatch::{Delivery, SessionError};
use crate::runtime::ssh::RemoteProcess;
use crate::store::{now_ms, EndReason, SessionKind, SessionState, UsageDelta};

/// How long a new agent process may take to answer its `initialize` request.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a closing agent may take to exit after its stdin closes.
const AGENT_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Requests to an actor.
#[derive(Debug)]
pub(super) enum Request {
    /// A message for the agent (a person's, or one the bot injects).
    Message {
        text: String,
        reply: oneshot::Sender<Delivery>,
    },
    /// `/compact`.
    Compact { reply: oneshot::Sender<()> },
    /// New conversation.
    Clear { reply: oneshot::Sender<()> },
    /// Same conversation, new process.
    Restart { reply: oneshot::Sender<()> },
    /// Stop the agent; the manager cleans up.
    Shutdown { reply: oneshot::Sender<()> },
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
    pub async fn message(&self, text: String) -> Result<Delivery, SessionError> {
        self.ask(|reply| Request::Message { text, reply }).await
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

/// The running agent.
struct Agent {
    process: RemoteProcess,
    stdin: openssh::ChildStdin,
    lines: tokio::io::Lines<BufReader<openssh::ChildStdout>>,
}

impl Agent {
    async fn write(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await
    }

    /// Closes stdin (the CLI exits after its turn) and waits briefly for the process.
    async fn close(mut self) {
        let _ = self.stdin.shutdown().await;
        drop(self.stdin);
        let wait = self.process.child.wait();
        if tokio::time::timeout(AGENT_EXIT_GRACE, wait).await.is_err() {
            debug!("agent did not exit in time; its channel is closed");
        }
    }
}

pub(super) struct Actor {
    pub(super) manager: Arc<Manager>,
    pub(super) plan: SessionPlan,
    /// `None` when resuming after a bot restart.
    pub(super) progress: Option<PostRef>,
    /// Messages for the agent produced by marker handlers during a turn, delivered after it.
    pub(super) injected: std::sync::Mutex<Vec<String>>,
    /// The agent process's running `total_cost_usd`, to turn it into per-turn amounts.
    pub(super) last_total_cost: std::sync::Mutex<f64>,
    /// Orchestrators: when to compact (see [`super::AutoCompact`]).
    pub(super) auto_compact: std::sync::Mutex<super::AutoCompact>,
}

enum Step {
    Continue,
    /// The session is over: clean up.
    Exit(EndReason, Option<String>),
    /// The bot is shutting down: leave the session for `recover` at the next start.
    Detach,
    /// The agent's stream ended unexpectedly (exit or a lost SSH connection): try to resume.
    AgentLost(String),
}

/// How many times a lost agent is resumed within [`RESUME_WINDOW`] before the session ends.
const RESUME_BUDGET: usize = 3;
/// The window [`RESUME_BUDGET`] counts in.
const RESUME_WINDOW: Duration = Duration::from_secs(600);

impl Actor {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let id = self.plan.session.id.clone();
        let (output, output_task) = spawn_thread_output(
            Arc::clone(&self.manager.chat),
            self.plan.session.channel_id.clone(),
            self.plan.session.thread_id.clone(),
            self.manager.config.coalesce,
        );
        let mut queue: VecDeque<String> = VecDeque::new();
        let mut shutdown_waiters: Vec<oneshot::Sender<()>> = Vec::new();

        // Bring the session up, queueing what arrives meanwhile.
        let agent = {
            let bring_up = self.bring_up();
            tokio::pin!(bring_up);
            loop {
                tokio::select! {
                    result = &mut bring_up => break result,
                    request = rx.recv() => match request {
                        Some(Request::Message { text, reply }) => {
                            queue.push_back(text);
                            let _ = reply.send(Delivery::Queued { position: queue.len() });
                        }
                        Some(Request::Shutdown { reply }) => {
                            shutdown_waiters.push(reply);
                            break Err(("stopped while starting".to_owned(), EndReason::UserRequested));
                        }
                        Some(Request::Compact { reply } | Request::Clear { reply } | Request::Restart { reply }) => {
                            let _ = reply.send(());
                        }
                        None => break Err(("the bot is shutting down".to_owned(), EndReason::Error)),
                    }
                }
            }
        };
        if rx.is_closed() && agent.is_err() && shutdown_waiters.is_empty() {
            // The bot stops while this session starts: `recover` decides at the next start.
            drop(output);
            let _ = output_task.await;
            return;
        }
        let mut agent = match agent {
            Ok(agent) => agent,
            Err((message, reason)) => {
                drop(output);
                let _ = output_task.await;
                self.manager.finish(&id, reason, Some(message)).await;
                for w in shutdown_waiters {
                    let _ = w.send(());
                }
                return;
            }
        };

        let mut busy = false;
        let mut pending = Pending::None;
        let mut scanner = self.scanner();
        let mut seen_tools: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut resumes: Vec<tokio::time::Instant> = Vec::new();
        if let Some(next) = queue.pop_front() {
            busy = self.send_turn(&mut agent, &mut queue, next).await;
        }
        let end: Option<(EndReason, Option<String>)> = loop {
            let step = tokio::select! {
                request = rx.recv() => match request {
                    None => Step::Detach,
                    Some(Request::Shutdown { reply }) => {
                        shutdown_waiters.push(reply);
                        Step::Exit(EndReason::UserRequested, None)
                    }
                    Some(Request::Message { text, reply }) => {
                        if busy || !queue.is_empty() {
                            queue.push_back(text);
                            let _ = reply.send(Delivery::Queued { position: queue.len() });
                        } else {
                            let _ = reply.send(Delivery::Delivered);
                            busy = self.send_turn(&mut agent, &mut queue, text).await;
                        }
                        Step::Continue
                    }
                    Some(Request::Compact { reply }) => {
                        let _ = reply.send(());
                        if busy || !queue.is_empty() {
                            queue.push_back("/compact".into());
                        } else {
                            busy = self.send_turn(&mut agent, &mut queue, "/compact".to_owned()).await;
                        }
                        Step::Continue
                    }
                    Some(Request::Clear { reply }) => {
                        let _ = reply.send(());
                        pending = Pending::Clear;
                        Step::Continue
                    }
                    Some(Request::Restart { reply }) => {
                        let _ = reply.send(());
                        if pending != Pending::Clear {
                            pending = Pending::Restart;
                        }
                        Step::Continue
                    }
                },
                line = agent.lines.next_line() => match line {
                    Ok(Some(line)) => {
                        let turn_over = self.on_line(&line, &output, &mut scanner, &mut seen_tools).await;
                        if turn_over {
                            busy = false;
                            seen_tools.clear();
                        }
                        Step::Continue
                    }
                    Ok(None) => Step::AgentLost("the agent's output ended".into()),
                    Err(e) => Step::AgentLost(format!("reading the agent failed: {e}")),
                },
            };
            match step {
                Step::Continue => {}
                Step::Exit(reason, detail) => break Some((reason, detail)),
                Step::Detach => break None,
                Step::AgentLost(why) => {
                    resumes.retain(|t: &tokio::time::Instant| t.elapsed() < RESUME_WINDOW);
                    if resumes.len() >= RESUME_BUDGET {
                        break Some((
                            EndReason::AgentExited,
                            Some(format!(
                                "{why}; it stopped {RESUME_BUDGET} times in {} minutes",
                                RESUME_WINDOW.as_secs() / 60
                            )),
                        ));
                    }
                    resumes.push(tokio::time::Instant::now());
                    warn!(session = %self.plan.session.id, %why, "agent lost; resuming the conversation");
                    let _ = output.send(TurnInput::EndTurn).await;
                    scanner.reset();
                    seen_tools.clear();
                    let was_busy = busy;
                    busy = false;
                    match self.replace_agent_quietly(agent).await {
                        Ok(new_agent) => {
                            agent = new_agent;
                            let note = if was_busy {
                                "⚠️ The connection to Claude was lost in the middle of an answer; Claude was restarted and the conversation resumed. The interrupted answer may be incomplete: ask again if needed."
                            } else {
                                "⚠️ The connection to Claude was lost; Claude was restarted and the conversation resumed."
                            };
                            self.manager.say(&self.plan.session, note).await;
                        }
                        Err(message) => {
                            drop(output);
                            let _ = output_task.await;
                            self.manager
                                .finish(
                                    &id,
                                    EndReason::AgentExited,
                                    Some(format!("{why}; resuming failed: {message}")),
                                )
                                .await;
                            for w in shutdown_waiters {
                                let _ = w.send(());
                            }
                            return;
                        }
                    }
                }
            }
            if !busy && pending != Pending::None {
                let fresh = pending == Pending::Clear;
                pending = Pending::None;
                match self.replace_agent(agent, fresh).await {
                    Ok(new_agent) => agent = new_agent,
                    Err(message) => {
                        // The old agent is gone and no new one runs: the session is over.
                        let _ = output.send(TurnInput::EndTurn).await;
                        drop(output);
                        let _ = output_task.await;
                        self.manager
                            .finish(&id, EndReason::Error, Some(message))
                            .await;
                        for w in shutdown_waiters {
                            let _ = w.send(());
                        }
                        return;
                    }
                }
            }
            if let Ok(mut injected) = self.injected.lock() {
                queue.extend(injected.drain(..));
            }
            // An orchestrator compacts between turns, before its next message.
            if !busy && self.plan.session.kind == SessionKind::Orchestrator {
                let due = self
                    .auto_compact
                    .lock()
                    .map(|mut p| p.due(tokio::time::Instant::now()))
                    .unwrap_or(false);
                if due {
                    info!(session = %self.plan.session.id, "auto-compacting the orchestrator");
                    queue.push_front("/compact".to_owned());
                }
            }
            if !busy {
                if let Some(next) = queue.pop_front() {
                    busy = self.send_turn(&mut agent, &mut queue, next).await;
                }
            }
        };
        let _ = output.send(TurnInput::EndTurn).await;
        drop(output);
        let _ = output_task.await;
        agent.close().await;
        let Some((reason, detail)) = end else {
            // Detached for a bot shutdown: the session stays and resumes at the next start.
            if !queue.is_empty() {
                let n = queue.len();
                self.manager
                    .say(&self.plan.session, &format!("⚠️ The bot is restarting; {n} queued message(s) were not delivered. Please send them again once it says the session continues."))
                    .await;
            }
            return;
        };
        if !queue.is_empty() {
            let dropped = queue.len();
            self.manager
                .say(
                    &self.plan.session,
                    &format!(
                        "{dropped} queued message(s) were not delivered because the session ended."
                    ),
                )
                .await;
        }
        self.manager.finish(&id, reason, detail).await;
        for w in shutdown_waiters {
            let _ = w.send(());
        }
    }

    /// The cost of the turn that just ended: the CLI's per-turn figure when it gives one;
    /// otherwise the growth of its running total for the conversation (which keeps counting
    /// across `--resume`, so it is reset only for a new conversation).
    fn cost_delta(&self, turn: Option<f64>, total: Option<f64>) -> f64 {
        let Ok(mut last) = self.last_total_cost.lock() else {
            return 0.0;
        };
        let from_total = total.map(|t| {
            let delta = if t >= *last { t - *last } else { t };
            *last = t;
            delta
        });
        turn.or(from_total).unwrap_or(0.0)
    }

    fn scanner(&self) -> MarkerScanner {
        MarkerScanner::new(match self.plan.session.kind {
            SessionKind::Orchestrator => MarkerSet::Orchestrator,
            _ => MarkerSet::Agent,
        })
    }

    /// Writes a user turn. Returns whether a turn is now running.
    /// Writes a user turn. Returns whether a turn is now running. When the agent's input is
    /// closed (its process or SSH channel died), the message goes back to the front of `queue`:
    /// the end of the agent's output follows, the conversation is resumed in a new process, and
    /// the queue delivers it there. Nothing is dropped.
    async fn send_turn(
        &self,
        agent: &mut Agent,
        queue: &mut VecDeque<String>,
        text: String,
    ) -> bool {
        let line = stream_json::user_turn(&text);
        let is_compact = text == "/compact";
        if let Err(e) = agent.write(&line).await {
            warn!(session = %self.plan.session.id, error = %e, "cannot write to the agent; the message waits for the agent to be resumed");
            queue.push_front(text);
            return false;
        }
        if !is_compact {
            if let Ok(mut policy) = self.auto_compact.lock() {
                policy.on_message();
            }
        }
        let usage = UsageDelta {
            messages: 1,
            ..UsageDelta::default()
        };
        if let Err(e) = self
            .manager
            .store
            .add_usage(&self.plan.session.id, &usage, now_ms())
            .await
        {
            warn!(error = %e, "cannot count a message");
        }
        let _ = self
            .manager
            .store
            .set_session_state(&self.plan.session.id, SessionState::Running)
            .await;
        true
    }

    /// Handles one stdout line. Returns whether the turn ended.
    async fn on_line(
        &self,
        line: &str,
        output: &mpsc::Sender<TurnInput>,
        scanner: &mut MarkerScanner,
        seen_tools: &mut std::collections::HashSet<String>,
    ) -> bool {
        let event = match stream_json::decode_line(line) {
            Ok(event) => event,
            Err(e) => {
                debug!(session = %self.plan.session.id, error = %e, "agent printed a line that is not stream-json");
                return false;
            }
        };
        match event {
            AgentEvent::Assistant {
                blocks,
                usage,
                parent_tool_use_id,
                ..
            } => {
                if let Some(usage) = usage.filter(|_| parent_tool_use_id.is_none()) {
                    let delta = UsageDelta {
                        context_tokens: Some(usage.context_tokens()),
                        ..UsageDelta::default()
                    };
                    let _ = self
                        .manager
                        .store
                        .add_usage(&self.plan.session.id, &delta, now_ms())
                        .await;
                }
                for block in blocks {
                    match block {
                        AssistantBlock::Text(text) if parent_tool_use_id.is_none() => {
                            let mut text = text;
                            if !text.ends_with('\n') {
                                text.push('\n');
                            }
                            for event in scanner.feed(&text) {
                                self.scan_event(event, output).await;
                            }
                        }
                        AssistantBlock::ToolUse { id, name, input } => {
                            // The CLI may announce a call before its input: show it once.
                            let empty = input.as_object().is_some_and(serde_json::Map::is_empty);
                            if !empty && seen_tools.insert(id) {
                                let _ = output.send(TurnInput::ToolUse { name, input }).await;
                            }
                        }
                        _ => {}
                    }
                }
                false
            }
            AgentEvent::Result(result) => {
                for event in scanner.finish() {
                    self.scan_event(event, output).await;
                }
                scanner.reset();
                let _ = output.send(TurnInput::EndTurn).await;
                let delta = UsageDelta {
                    input_tokens: result.usage.input_tokens
                        + result.usage.cache_creation_input_tokens
                        + result.usage.cache_read_input_tokens,
                    output_tokens: result.usage.output_tokens,
                    cost_usd: self.cost_delta(result.turn_cost_usd, result.total_cost_usd),
                    ..UsageDelta::default()
                };
                let _ = self
                    .manager
                    .store
                    .add_usage(&self.plan.session.id, &delta, now_ms())
                    .await;
                let _ = self
                    .manager
                    .store
                    .set_session_state(&self.plan.session.id, SessionState::Idle)
                    .await;
                if result.is_error {
                    let why = result.result.unwrap_or_else(|| result.subtype.clone());
                    self.manager
                        .say(
                            &self.plan.session,
                            &format!("⚠️ Claude's turn ended with an error: {why}"),
                        )
                        .await;
                }
                true
            }
            AgentEvent::CompactBoundary => {
                let delta = UsageDelta {
                    compactions: 1,
                    ..UsageDelta::default()
                };
                let _ = self
                    .manager
                    .store
                    .add_usage(&self.plan.session.id, &delta, now_ms())
                    .await;
                false
            }
            AgentEvent::Init { session_id, .. } => {
                debug!(session = %self.plan.session.id, conversation = %session_id, "agent initialised");
                false
            }
            AgentEvent::ControlRequest {
                request_id,
                subtype,
                ..
            } => {
                debug!(session = %self.plan.session.id, %subtype, %request_id, "unexpected control request from the agent");
                false
            }
            AgentEvent::Other { kind } => {
                debug!(session = %self.plan.session.id, %kind, "agent event not handled");
                false
            }
            AgentEvent::ToolResults { .. } | AgentEvent::ControlResponse { .. } => false,
        }
    }

    async fn scan_event(&self, event: ScanEvent, output: &mpsc::Sender<TurnInput>) {
        match event {
            ScanEvent::Text(text) => {
                let _ = output.send(TurnInput::Text(text)).await;
            }
            ScanEvent::Marker(marker) => {
                let replies = self
                    .manager
                    .markers
                    .on_marker(&self.plan.session, marker)
                    .await;
                self.injected
                    .lock()
                    .map(|mut q| q.extend(replies))
                    .unwrap_or_default();
            }
        }
    }

    /// Brings the session up: clone, container and agent (or, when resuming, only the agent).
    async fn bring_up(&mut self) -> Result<Agent, (String, EndReason)> {
        let manager = Arc::clone(&self.manager);
        let mut progress = self
            .progress
            .clone()
            .map(|post| Progress::new(Arc::clone(&manager.chat), post));
        let result = manager.prepare(&mut self.plan, progress.as_mut()).await;
        if let Err((message, hint, reason)) = result {
            if let Some(p) = progress.as_mut() {
                p.failed(&message, &hint).await;
            } else {
                manager
                    .say(
                        &self.plan.session,
                        &format!("❌ {message}\n\n**What to do:** {hint}"),
                    )
                    .await;
            }
            return Err((message, reason));
        }
        if let Some(p) = progress.as_mut() {
            p.step("Starting Claude").await;
        }
        match self.spawn_agent(false).await {
            Ok(agent) => {
                let _ = manager
                    .store
                    .set_session_state(&self.plan.session.id, SessionState::Idle)
                    .await;
                match progress.as_mut() {
                    Some(p) => p.ready("Ready: Claude is listening in this thread.").await,
                    None => {
                        manager
                            .say(&self.plan.session, "🔄 The bot restarted; this session continues where it was (conversation resumed).")
                            .await;
                    }
                }
                info!(session = %self.plan.session.id, "session ready");
                Ok(agent)
            }
            Err(message) => {
                let hint = "check that the Claude Code CLI is installed in the container image and that its credentials are set on the VM (SM_CONTAINER_ENV)";
                match progress.as_mut() {
                    Some(p) => p.failed(&message, hint).await,
                    None => {
                        manager
                            .say(
                                &self.plan.session,
                                &format!("❌ {message}\n\n**What to do:** {hint}"),
                            )
                            .await
                    }
                }
                Err((message, EndReason::StartFailed))
            }
        }
    }

    /// Starts the agent process and waits until it answers `initialize`. With `fresh`, a new
    /// conversation id is chosen (and stored) first.
    async fn spawn_agent(&mut self, fresh: bool) -> Result<Agent, String> {
        let manager = Arc::clone(&self.manager);
        let session = &mut self.plan.session;
        let (conversation, resume) = match (&session.agent_session_id, fresh) {
            (Some(existing), false) => (existing.clone(), true),
            _ => (uuid::Uuid::new_v4().to_string(), false),
        };
        if !resume {
            manager
                .store
                .set_agent_session_id(&session.id, Some(&conversation))
                .await
                .map_err(|e| format!("cannot store the conversation id: {e}"))?;
            session.agent_session_id = Some(conversation.clone());
        }
        let script = manager.agent_script(session, &self.plan.container, &conversation, resume)?;
        let mut process = manager
            .ssh
            .spawn(&script)
            .await
            .map_err(|e| format!("cannot start Claude: {e}"))?;
        let stdin = process
            .child
            .stdin()
            .take()
            .ok_or("the agent has no stdin")?;
        let stdout = process
            .child
            .stdout()
            .take()
            .ok_or("the agent has no stdout")?;
        if let Some(stderr) = process.child.stderr().take() {
            let id = session.id.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    debug!(session = %id, stderr = %line, "agent stderr");
                }
            });
        }
        let mut agent = Agent {
            process,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        if !resume {
            // A new conversation's running total starts from zero.
            if let Ok(mut last) = self.last_total_cost.lock() {
                *last = 0.0;
            }
        }
        let request_id = format!("init-{}", uuid::Uuid::new_v4().simple());
        agent
            .write(&stream_json::control_request(&request_id, "initialize"))
            .await
            .map_err(|e| format!("cannot talk to Claude: {e}"))?;
        let ready = async {
            loop {
                match agent.lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Ok(AgentEvent::ControlResponse {
                            request_id: Some(id),
                            ..
                        }) = stream_json::decode_line(&line)
                        {
                            if id == request_id {
                                return Ok(());
                            }
                        }
                    }
                    Ok(None) => return Err("Claude exited right after starting".to_owned()),
                    Err(e) => return Err(format!("reading Claude failed: {e}")),
                }
            }
        };
        match tokio::time::timeout(AGENT_READY_TIMEOUT, ready).await {
            Ok(Ok(())) => Ok(agent),
            Ok(Err(message)) => Err(message),
            Err(_) => Err(format!(
                "Claude did not answer within {AGENT_READY_TIMEOUT:?}"
            )),
        }
    }

    /// Replaces a lost agent with a new process resuming the same conversation.
    async fn replace_agent_quietly(&mut self, old: Agent) -> Result<Agent, String> {
        old.close().await;
        self.spawn_agent(false).await
    }

    /// Replaces the agent process after a turn: `fresh` starts a new conversation (`clear`),
    /// otherwise the same one is resumed (`restart`).
    async fn replace_agent(&mut self, old: Agent, fresh: bool) -> Result<Agent, String> {
        old.close().await;
        let agent = self.spawn_agent(fresh).await?;
        let note = if fresh {
            "🧹 Started a fresh conversation."
        } else {
            "🔄 Restarted Claude; the conversation continues."
        };
        self.manager.say(&self.plan.session, note).await;
        Ok(agent)
    }
}
