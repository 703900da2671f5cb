//! Markers from agents, as events.
//!
//! A session's actor does not call whoever handles its markers: it sends each marker the
//! scanner finds ([`crate::agent::markers`]) as a [`MarkerEvent`] on a channel. [`route`]
//! consumes that channel and hands each event to the handler for its kind (network requests to
//! the approval flow, the rest to the orchestrator). Replies (e.g. `[NETWORK_DENIED: …]`,
//! `[SESSION_CREATED: …]`) go back to the agent as messages through the runtime, queued like a
//! user's during a turn. So ownership is a tree: the runtime knows only the channel's sender,
//! and the handlers hold the runtime.
//!
//! Events of one session are handled in order; sessions proceed in parallel (an orchestrator
//! spawning workers never delays another session's network request).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent::markers::Marker;
use crate::store::Session;
use crate::workers::OrderedWorkers;

use super::SessionRuntime;

/// Markers a router holds per session before the sending actor waits.
const QUEUE: usize = 64;
/// A session's marker worker with nothing to do for this long exits.
const IDLE: Duration = Duration::from_secs(60);

/// A marker printed by a session's agent.
#[derive(Debug, Clone)]
pub struct MarkerEvent {
    /// The session whose agent printed it, as the actor knows it.
    pub session: Session,
    /// The marker.
    pub marker: Marker,
}

/// Handles markers of one kind. Approvals and the orchestrator implement it.
#[async_trait]
pub trait MarkerHandler: Send + Sync + 'static {
    /// Handles one marker from `session`'s agent; returns messages to deliver to it.
    async fn on_marker(&self, session: &Session, marker: Marker) -> Vec<String>;
}

/// Who handles which marker.
#[derive(Clone)]
pub struct MarkerHandlers {
    /// `[NETWORK_REQUEST: …]`.
    pub network: Arc<dyn MarkerHandler>,
    /// Everything else (orchestrator markers, malformed markers).
    pub orchestrator: Arc<dyn MarkerHandler>,
}

impl MarkerHandlers {
    async fn handle(&self, event: MarkerEvent) -> Vec<String> {
        match event.marker {
            Marker::NetworkRequest { .. } => {
                self.network.on_marker(&event.session, event.marker).await
            }
            other => self.orchestrator.on_marker(&event.session, other).await,
        }
    }
}

/// Consumes marker events until `stop` fires, then handles what is still queued (the actors
/// have stopped by then) and returns once every handler has finished.
pub async fn route(
    mut events: mpsc::Receiver<MarkerEvent>,
    handlers: MarkerHandlers,
    runtime: SessionRuntime,
    stop: CancellationToken,
) {
    let mut workers = OrderedWorkers::new(QUEUE, IDLE, move |event: MarkerEvent| {
        let handlers = handlers.clone();
        let runtime = runtime.clone();
        async move {
            let session_id = event.session.id.clone();
            for reply in handlers.handle(event).await {
                if let Err(e) = runtime.inject(&session_id, reply).await {
                    info!(session = %session_id, error = %e, "cannot deliver a marker's answer (the session is not running)");
                }
            }
        }
    });
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            event = events.recv() => event,
        };
        let Some(event) = event else { break };
        workers.send(event.session.id.clone(), event).await;
    }
    events.close();
    while let Some(event) = events.recv().await {
        workers.send(event.session.id.clone(), event).await;
    }
    workers.shutdown().await;
}
