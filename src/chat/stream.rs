//! Streams an agent's turns into one chat thread.
//!
//! [`spawn_thread_output`] starts a task that owns a [`TurnRenderer`] and performs its
//! operations against a [`ChatOutbound`]: the first words of a turn are posted at once, then
//! the same post is edited at most once per interval, and new posts continue when one fills
//! up. While a turn runs, the typing indicator is refreshed. Tool calls appear as compact lines
//! ([`tool_use_line`]).
//!
//! A post that could not be created is created on the next operation for it (each operation
//! carries the post's whole text), so a chat outage delays text but does not lose it.
//!
//! Every post's text is made inert first ([`neutralize`]): the agent's mentions notify nobody
//! and its images are plain links.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use super::render::{neutralize, tool_use_line, CoalesceConfig, PostOp, TurnRenderer};
use super::{ChatOutbound, PostRef};

/// How often the typing indicator is refreshed during a turn (Mattermost shows it ~5 s).
pub const TYPING_REFRESH: Duration = Duration::from_secs(4);

/// Input for a thread's output.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnInput {
    /// Agent text (Markdown), in order.
    Text(String),
    /// The agent called a tool.
    ToolUse {
        /// Tool name, e.g. `Bash`.
        name: String,
        /// Tool input.
        input: Value,
    },
    /// The turn is over: flush everything and stop the typing indicator.
    EndTurn,
}

/// Starts the output task for the thread anchored at `root_id` in `channel_id`. It runs until
/// every sender is dropped, flushing what it holds first.
pub fn spawn_thread_output(
    chat: Arc<dyn ChatOutbound>,
    channel_id: String,
    root_id: String,
    config: CoalesceConfig,
) -> (mpsc::Sender<TurnInput>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let handle = tokio::spawn(run(chat, channel_id, root_id, config, rx));
    (tx, handle)
}

struct Output {
    chat: Arc<dyn ChatOutbound>,
    channel_id: String,
    root_id: String,
    /// Post of each slot of the current turn; `None` while its creation has failed.
    slots: Vec<Option<PostRef>>,
}

impl Output {
    async fn perform(&mut self, ops: Vec<PostOp>) {
        for op in ops {
            let (slot, text, is_create) = match op {
                PostOp::Create { slot, text } => (slot, neutralize(&text), true),
                PostOp::Update { slot, text } => (slot, neutralize(&text), false),
            };
            if self.slots.len() <= slot {
                self.slots.resize(slot + 1, None);
            }
            let existing = self.slots.get(slot).cloned().flatten();
            match existing {
                Some(post) if !is_create => {
                    if let Err(e) = self.chat.update(&post, &text).await {
                        warn!(error = %e, post = %post.post_id, "cannot update streamed post; the next update carries the text");
                    }
                }
                _ => match self
                    .chat
                    .post(&self.channel_id, Some(&self.root_id), &text)
                    .await
                {
                    Ok(post) => {
                        if let Some(entry) = self.slots.get_mut(slot) {
                            *entry = Some(post);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot create streamed post; retrying with the next update")
                    }
                },
            }
        }
    }

    async fn typing(&self) {
        if let Err(e) = self
            .chat
            .typing(&self.channel_id, Some(&self.root_id))
            .await
        {
            tracing::debug!(error = %e, "typing indicator failed");
        }
    }
}

async fn run(
    chat: Arc<dyn ChatOutbound>,
    channel_id: String,
    root_id: String,
    config: CoalesceConfig,
    mut rx: mpsc::Receiver<TurnInput>,
) {
    let mut out = Output {
        chat,
        channel_id,
        root_id,
        slots: Vec::new(),
    };
    let mut renderer = TurnRenderer::new(config);
    let mut in_turn = false;
    let mut next_typing = Instant::now();
    loop {
        let deadline = renderer.next_deadline().map(Instant::from_std);
        let typing_due = in_turn.then_some(next_typing);
        let input = tokio::select! {
            input = rx.recv() => input,
            () = sleep_until(deadline) => {
                let ops = renderer.poll(Instant::now().into_std());
                out.perform(ops).await;
                continue;
            }
            () = sleep_until(typing_due) => {
                out.typing().await;
                next_typing = Instant::now() + TYPING_REFRESH;
                continue;
            }
        };
        let now = Instant::now().into_std();
        match input {
            Some(TurnInput::Text(text)) => {
                if !in_turn {
                    in_turn = true;
                    out.typing().await;
                    next_typing = Instant::now() + TYPING_REFRESH;
                }
                let ops = renderer.push(&text, now);
                out.perform(ops).await;
            }
            Some(TurnInput::ToolUse { name, input }) => {
                if !in_turn {
                    in_turn = true;
                    out.typing().await;
                    next_typing = Instant::now() + TYPING_REFRESH;
                }
                let line = format!("\n{}\n", tool_use_line(&name, &input));
                let ops = renderer.push(&line, now);
                out.perform(ops).await;
            }
            Some(TurnInput::EndTurn) | None => {
                let ops = renderer.finish(now);
                out.perform(ops).await;
                renderer = TurnRenderer::new(config);
                out.slots.clear();
                in_turn = false;
                if input.is_none() {
                    return;
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
