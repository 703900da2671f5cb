//! The Mattermost WebSocket listener (`GET /api/v4/websocket`).
//!
//! Protocol facts (`shared/reference/wire-formats.md` §1.4, from `web_conn.go` and the official
//! client's `websocket.ts`):
//! - the upgrade carries `Authorization: Bearer`, so `hello` (seq 0) arrives first;
//! - every event carries `seq`, counting up from 0 per connection; responses carry `seq_reply`;
//! - reconnecting with `?connection_id=<hello's id>&sequence_number=<next seq>` resumes: the
//!   server replays missed events with their original `seq` and sends no `hello`; if it cannot
//!   (the dead queue holds 128 events), it sends a new `hello` with a new `connection_id`.
//!
//! The listener sends a `ping` action every [`WsSettings::ping_interval`] and treats a socket
//! that delivers nothing for [`WsSettings::read_timeout`] as dead, so a dead socket is noticed
//! within two minutes. It reconnects with jittered exponential backoff. A `seq` gap makes it
//! reconnect and resume from the first missing event.
//!
//! Notices are delivered through a bounded channel with `send().await`: when the consumer is
//! slow the listener stops reading and TCP pushes back; nothing is dropped. When events may
//! have been missed (a fresh connection that did not resume), the listener says so with
//! [`WsNotice::Connected`] `{ resumed: false }` and the consumer catches up over REST.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::model::{WsEvent, WsFrame};
use super::rest::MattermostClient;

/// Timing of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsSettings {
    /// How often a `ping` action is sent.
    pub ping_interval: Duration,
    /// A socket silent for this long is considered dead and replaced.
    pub read_timeout: Duration,
    /// First reconnect delay.
    pub min_backoff: Duration,
    /// Largest reconnect delay.
    pub max_backoff: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            read_timeout: Duration::from_secs(90),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// What the listener reports.
#[derive(Debug, Clone, PartialEq)]
pub enum WsNotice {
    /// A connection is up. `resumed: false` means events since the previous connection (or
    /// since start) may be missing and must be fetched over REST.
    Connected {
        /// The server's id for this connection.
        connection_id: String,
        /// Whether the server replayed what was missed.
        resumed: bool,
    },
    /// An event, in `seq` order, each exactly once per connection.
    Event(WsEvent),
    /// The connection was lost; the listener is reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
}

/// Where a connection can resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resume {
    connection_id: String,
    next_seq: i64,
}

/// Runs until `cancel` fires or the receiver is dropped.
pub async fn run(
    client: MattermostClient,
    settings: WsSettings,
    tx: mpsc::Sender<WsNotice>,
    cancel: CancellationToken,
) {
    let mut resume: Option<Resume> = None;
    let backoff_builder = ExponentialBuilder::default()
        .with_min_delay(settings.min_backoff)
        .with_max_delay(settings.max_backoff)
        .with_jitter()
        .without_max_times();
    let mut backoff = backoff_builder.build();
    loop {
        let started = tokio::time::Instant::now();
        let end = tokio::select! {
            () = cancel.cancelled() => return,
            end = connection(&client, &settings, &mut resume, &tx) => end,
        };
        let reason = match end {
            Err(End::ReceiverGone) => return,
            Err(End::Lost(reason)) => reason,
        };
        warn!(%reason, "Mattermost WebSocket lost; reconnecting");
        if tx.send(WsNotice::Disconnected { reason }).await.is_err() {
            return;
        }
        // A connection that lived a while resets the backoff.
        if started.elapsed() > settings.read_timeout {
            backoff = backoff_builder.build();
        }
        let delay = backoff.next().unwrap_or(settings.max_backoff);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// Nobody listens any more: stop.
    ReceiverGone,
    /// The connection broke: reconnect.
    Lost(String),
}

impl From<String> for End {
    fn from(reason: String) -> Self {
        End::Lost(reason)
    }
}

impl From<&str> for End {
    fn from(reason: &str) -> Self {
        End::Lost(reason.to_owned())
    }
}

/// One connection, from upgrade to loss; it only ever ends with an [`End`].
async fn connection(
    client: &MattermostClient,
    settings: &WsSettings,
    resume: &mut Option<Resume>,
    tx: &mpsc::Sender<WsNotice>,
) -> Result<std::convert::Infallible, End> {
    let mut url = client.websocket_url();
    if let Some(r) = resume.as_ref() {
        url.query_pairs_mut()
            .append_pair("connection_id", &r.connection_id)
            .append_pair("sequence_number", &r.next_seq.to_string());
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad WebSocket URL: {e}"))?;
    request.headers_mut().insert(
        reqwest::header::AUTHORIZATION,
        client.authorization().clone(),
    );
    let (socket, _) = tokio::time::timeout(
        settings.read_timeout,
        tokio_tungstenite::connect_async(request),
    )
    .await
    .map_err(|_| End::from("WebSocket upgrade timed out"))?
    .map_err(|e| format!("WebSocket upgrade failed: {e}"))?;
    let (mut sink, mut stream) = socket.split();
    // The upgrade carried the token; the challenge also authenticates behind proxies that drop
    // the header, and the server ignores it when the upgrade already did.
    let mut request_seq: i64 = 1;
    if let Some(token) = client
        .authorization()
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
    {
        let challenge = json!({ "seq": request_seq, "action": "authentication_challenge", "data": { "token": token } });
        sink.send(Message::Text(challenge.to_string().into()))
            .await
            .map_err(|e| format!("authentication challenge failed: {e}"))?;
    }

    let mut announced = false;
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await; // the first tick is immediate
    loop {
        let frame = tokio::select! {
            _ = ping.tick() => {
                request_seq += 1;
                let action = json!({ "seq": request_seq, "action": "ping" }).to_string();
                sink.send(Message::Text(action.into())).await.map_err(|e| format!("ping failed: {e}"))?;
                continue;
            }
            frame = tokio::time::timeout(settings.read_timeout, stream.next()) => frame,
        };
        let message = match frame {
            Err(_) => return Err(format!("no traffic for {:?}", settings.read_timeout).into()),
            Ok(None) => return Err("connection closed".into()),
            Ok(Some(Err(e))) => return Err(format!("read failed: {e}").into()),
            Ok(Some(Ok(message))) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                return Err(format!("server closed the connection: {frame:?}").into())
            }
            // Pings are answered by tungstenite; pongs and binary frames carry nothing for us.
            _ => continue,
        };
        let frame: WsFrame = match serde_json::from_str(text.as_str()) {
            Ok(frame) => frame,
            Err(e) => {
                warn!(error = %e, "ignoring a WebSocket frame that is not JSON");
                continue;
            }
        };
        let event = match frame {
            WsFrame::Response(response) => {
                if response.status != "OK" {
                    debug!(?response, "WebSocket request failed");
                }
                continue;
            }
            WsFrame::Event(event) => event,
        };
        if event.event == "hello" {
            let connection_id = event
                .data_str("connection_id")
                .unwrap_or_default()
                .to_owned();
            let was_resuming = resume.is_some();
            *resume = Some(Resume {
                connection_id: connection_id.clone(),
                next_seq: event.seq + 1,
            });
            announced = true;
            info!(%connection_id, "Mattermost WebSocket connected");
            if was_resuming {
                debug!("the server could not resume; events may have been missed");
            }
            send(
                tx,
                WsNotice::Connected {
                    connection_id,
                    resumed: false,
                },
            )
            .await?;
            continue;
        }
        let Some(position) = resume.as_mut() else {
            return Err(format!("event {:?} before hello", event.event).into());
        };
        if event.seq != position.next_seq {
            return Err(format!(
                "sequence gap: expected event {}, got {}",
                position.next_seq, event.seq
            )
            .into());
        }
        position.next_seq += 1;
        if !announced {
            announced = true;
            send(
                tx,
                WsNotice::Connected {
                    connection_id: position.connection_id.clone(),
                    resumed: true,
                },
            )
            .await?;
        }
        send(tx, WsNotice::Event(event)).await?;
    }
}

/// Delivers a notice, waiting while the consumer is busy (back-pressure, never a drop).
async fn send(tx: &mpsc::Sender<WsNotice>, notice: WsNotice) -> Result<(), End> {
    tx.send(notice).await.map_err(|_| End::ReceiverGone)
}
