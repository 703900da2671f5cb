//! Inbound Teams activities: `POST /api/messages`, the Bot Framework messaging endpoint.
//!
//! Every request is verified first ([`auth`](super::auth): 401 when the token fails a check,
//! logged with the reason and never the token; 503 when the signing keys cannot be fetched).
//! Then the activity is read and answered at once; the work happens elsewhere:
//!
//! - **`message` with text**: a channel message that mentions the bot, a reply in a thread,
//!   a personal or group chat message. The conversation reference is recorded, the message is
//!   recorded in storage by its activity id with its content
//!   ([`Store::record_inbound`](crate::store::Store::record_inbound), so a redelivery is
//!   handled once, and a message not handled when the bot stops is handled after it comes
//!   back), and an [`InboundMessage`] is queued for the dispatcher; the answer is 200
//!   with an empty body (TDOCS `conversation-messages.md`). When the queue stays full for
//!   [`ENQUEUE_TIMEOUT`], or storage fails, the answer is 503 and nothing was taken.
//! - **Mentions** of the bot are removed using `entities` (other mentions keep their names).
//!   When the message addresses the bot (a mention, or any message in a personal chat) and it
//!   is not talking to a session, the mention becomes `SM_BOT_TRIGGER`, so `@Bot start
//!   org/repo` reads as `@claude start org/repo` and the grammar is Mattermost's. In a
//!   session's thread (where every message must mention the bot unless the app has the
//!   `ChannelMessage.Read.Group` permission) the mention is simply dropped, unless the rest is
//!   a well-formed command (`@Bot stop`): text for Claude stays text.
//! - **Files and images** (any attachment but Teams' own `text/html` copy of the message, or
//!   an `<img>` inside it) are not supported yet: the text, if any, is delivered, and the bot
//!   answers in the thread which attachments were not (when the message addressed it or is
//!   in a session's thread). The design keeps [`ChatEvent`] unchanged: the adapter answers the
//!   notice itself.
//! - **Card clicks**: an `Action.Submit` arrives as a `message` with `value` (answered 200,
//!   empty); an `Action.Execute` as an `invoke` named `adaptiveCard/action`, answered in the
//!   HTTP response: always status 200 with an `AdaptiveCardInvokeResponse` body (§3.6): the new
//!   card (`application/vnd.microsoft.card.adaptive`), a message
//!   (`application/vnd.microsoft.activity.message`) or an error
//!   (`application/vnd.microsoft.error` with `statusCode` 400, 403, 404 or 503). Both go to the
//!   [`CardClickHandler`](crate::chat::CardClickHandler) in [`ClickHandlers`] as a
//!   [`CardClick`] whose `post_id` is `replyToId` (the message holding the card) and whose
//!   `context` is the button's data. A replaced card is also `PUT` for everyone (the invoke
//!   answer reaches only the clicking user; TDOCS `User-Specific-Views.md`); a notice after a
//!   submit is posted in the thread.
//! - Anything else (`conversationUpdate`, `typing`, `messageReaction`, other invokes) records
//!   the conversation reference and is answered 200 (other invokes 501, as BBJS does).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::adapter::{card_activity, reference_of, TeamsAdapter};
use super::auth::{AuthError, TEAMS_CHANNEL};
use super::card::{execute_context, invoke_error, invoke_reply, submit_context};
use super::model::{
    Activity, AdaptiveCardInvokeResponse, Attachment, ChannelAccount, Entity, TeamsChannelData,
    ADAPTIVE_CARD_ACTION, ADAPTIVE_CARD_CONTENT_TYPE, ADAPTIVE_CARD_CONTENT_TYPE_ALT,
};
use super::{conversation_id, split_conversation_id};
use crate::chat::{
    CardClick, ChatEvent, ChatOutbound, ClickError, ClickHandlers, ClickReply, InboundMessage,
    PostRef,
};
use crate::command::{self, ParseContext};
use crate::store::{now_ms, Platform, SessionKind, TeamsUser};

/// The messaging endpoint's path (the Azure Bot registration points here).
pub const MESSAGES_PATH: &str = "/api/messages";
/// How long a message waits for room in the dispatcher's queue before the request is
/// answered 503.
pub const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the route needs.
#[derive(Clone)]
struct Inbound {
    adapter: Arc<TeamsAdapter>,
    events: mpsc::Sender<ChatEvent>,
    clicks: ClickHandlers,
}

/// The route Teams posts activities to: `POST /api/messages`, verified, parsed, queued on
/// `events` and answered at once (see the module documentation). Clicks go to whatever
/// handler `clicks` holds (invokes are answered 503-coded before there is one).
pub fn routes(
    adapter: Arc<TeamsAdapter>,
    events: mpsc::Sender<ChatEvent>,
    clicks: ClickHandlers,
) -> Router {
    Router::new()
        .route(MESSAGES_PATH, post(messages))
        .with_state(Inbound {
            adapter,
            events,
            clicks,
        })
}

/// What an inbound activity says about where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The channel (conversation id up to `;messageid=`) or the chat.
    pub channel_id: String,
    /// The thread root in a channel (`None` outside a thread or in a chat).
    pub thread_root: Option<String>,
    /// `channel`, `personal` or `groupChat`.
    pub conversation_type: String,
}

impl Place {
    /// Where `activity` happened; `None` without a conversation id.
    pub fn of(activity: &Activity) -> Option<Self> {
        let conversation = activity.conversation.as_ref()?;
        if conversation.id.is_empty() {
            return None;
        }
        let (channel, root) = split_conversation_id(&conversation.id);
        let data = TeamsChannelData::from_value(activity.channel_data.as_ref());
        let conversation_type = match conversation.conversation_type.as_deref() {
            Some(t @ ("channel" | "personal" | "groupChat")) => t.to_owned(),
            _ if root.is_some() || data.channel_id.is_some() => "channel".to_owned(),
            _ if conversation.id.starts_with("a:") => "personal".to_owned(),
            _ => "groupChat".to_owned(),
        };
        Some(Self {
            channel_id: channel.to_owned(),
            thread_root: root
                .filter(|_| conversation_type == "channel")
                .map(str::to_owned),
            conversation_type,
        })
    }

    /// Whether it is a Teams channel (with threads).
    pub fn is_channel(&self) -> bool {
        self.conversation_type == "channel"
    }
}

/// The user id the rest of the bot sees: the AAD object id (lowercase), else the Teams
/// account id.
pub fn user_id(from: &ChannelAccount) -> String {
    from.aad_object_id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map_or_else(|| from.id.clone(), str::to_ascii_lowercase)
}

/// Removes the bot's mentions from `text` and unwraps everyone else's (`<at>Olo</at>` →
/// `Olo`), using `entities` (TDOCS `channel-and-group-conversations.md`). Returns the text,
/// trimmed, and whether the bot was mentioned.
pub fn strip_mentions(text: &str, entities: &[Entity], bot_id: &str) -> (String, bool) {
    let mut out = text.to_owned();
    let mut mentioned = false;
    for entity in entities.iter().filter(|e| e.entity_type == "mention") {
        let Some(shown) = entity.text.as_deref().filter(|t| !t.is_empty()) else {
            continue;
        };
        let is_bot = entity.mentioned.as_ref().is_some_and(|m| m.id == bot_id);
        if is_bot {
            if out.contains(shown) {
                mentioned = true;
            }
            out = out.replace(shown, " ");
        } else {
            let name = shown
                .trim_start_matches("<at>")
                .trim_end_matches("</at>")
                .to_owned();
            out = out.replace(shown, &name);
        }
    }
    // Collapse the blanks a removed mention leaves on its line; keep line breaks.
    let lines: Vec<String> = out
        .split('\n')
        .map(|line| {
            let mut clean = String::with_capacity(line.len());
            for word in line.split(' ').filter(|w| !w.is_empty()) {
                if !clean.is_empty() {
                    clean.push(' ');
                }
                clean.push_str(word);
            }
            clean
        })
        .collect();
    (lines.join("\n").trim().to_owned(), mentioned)
}

/// The text the dispatcher gets from a message that addresses the bot (see the module
/// documentation): `rest` as written when it already is a command; in a session's thread,
/// the trigger plus `rest` only when that is a well-formed command, else `rest`; elsewhere
/// the trigger plus `rest`.
pub fn addressed_text(rest: &str, trigger: &str, in_session: bool) -> String {
    let ctx = ParseContext {
        trigger,
        default_org: None,
        in_session_thread: in_session,
    };
    if command::parse(rest, &ctx).is_some() || trigger.trim().is_empty() {
        return rest.to_owned();
    }
    let candidate = if rest.is_empty() {
        trigger.to_owned()
    } else {
        format!("{trigger} {rest}")
    };
    if !in_session || matches!(command::parse(&candidate, &ctx), Some(Ok(_))) {
        candidate
    } else {
        rest.to_owned()
    }
}

/// What a message carries that the bot does not take yet: one label per attachment other
/// than cards and Teams' `text/html` copy of the message (an `<img>` in that copy counts as
/// an image).
pub fn unsupported_attachments(attachments: &[Attachment]) -> Vec<String> {
    let mut labels = Vec::new();
    for a in attachments {
        let kind = a.content_type.to_ascii_lowercase();
        let label = match kind.as_str() {
            "text/html" | "text/plain" => {
                let html = a.content.as_ref().and_then(Value::as_str).unwrap_or("");
                if html.to_ascii_lowercase().contains("<img") {
                    "an image".to_owned()
                } else {
                    continue;
                }
            }
            ADAPTIVE_CARD_CONTENT_TYPE | ADAPTIVE_CARD_CONTENT_TYPE_ALT => continue,
            k if k.starts_with("image/") => "an image".to_owned(),
            _ => match a.name.as_deref().filter(|n| !n.trim().is_empty()) {
                Some(name) => format!("the file `{}`", name.replace('`', "'")),
                None => "a file".to_owned(),
            },
        };
        if !labels.contains(&label) || label.starts_with("the file") {
            labels.push(label);
        }
    }
    labels
}

/// The answer telling the user which attachments were not delivered.
pub fn unsupported_notice(labels: &[String], text_delivered: bool) -> String {
    let what = labels.join(", ");
    let verb = if labels.len() == 1 { "was" } else { "were" };
    let rest = if text_delivered {
        " Only the text of your message was delivered."
    } else {
        ""
    };
    format!(
        "⚠️ Files and images are not supported yet: {what} {verb} not delivered to Claude.{rest}"
    )
}

/// `POST /api/messages`.
async fn messages(State(state): State<Inbound>, headers: HeaderMap, body: Bytes) -> Response {
    let peek: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let verified = state
        .adapter
        .authenticator()
        .verify(
            authorization,
            peek.get("serviceUrl").and_then(Value::as_str),
            peek.get("channelId").and_then(Value::as_str),
        )
        .await;
    if let Err(e) = verified {
        warn!(reason = e.reason(), error = %e, "refused a Bot Framework request");
        let status = match e {
            AuthError::KeysUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        return (status, Json(serde_json::json!({ "error": e.reason() }))).into_response();
    }
    let activity: Activity = match serde_path_to_error::deserialize(peek) {
        Ok(activity) => activity,
        Err(e) => return bad_request(&format!("not a Bot Framework activity: {e}")),
    };
    if activity
        .channel_id
        .as_deref()
        .is_some_and(|c| c != TEAMS_CHANNEL)
    {
        debug!(channel = ?activity.channel_id, "ignoring an activity from another channel");
        return StatusCode::OK.into_response();
    }
    let Some(place) = Place::of(&activity) else {
        return bad_request("the activity has no conversation");
    };
    let Some(service_url) = activity.service_url.clone() else {
        return bad_request("the activity has no serviceUrl");
    };
    let data = TeamsChannelData::from_value(activity.channel_data.as_ref());
    let conversation = activity.conversation.clone().unwrap_or_default();
    let reference = reference_of(
        &place.channel_id,
        &place.conversation_type,
        &service_url,
        conversation
            .tenant_id
            .as_deref()
            .or(data.tenant_id.as_deref())
            .unwrap_or_default(),
        data.team_id.as_deref().unwrap_or_default(),
        data.channel_name
            .as_deref()
            .or(conversation.name.as_deref())
            .unwrap_or_default(),
        activity
            .recipient
            .as_ref()
            .map_or(state.adapter.bot_user_id(), |r| r.id.as_str()),
    );
    if let Err(e) = state.adapter.remember(reference).await {
        warn!(error = %e, "cannot record a Teams conversation reference");
        return unavailable("storage is not available; try again");
    }
    match activity.activity_type.as_str() {
        "message" if activity.value.as_ref().is_some_and(Value::is_object) => {
            submit(&state, &activity, &place).await
        }
        "message" => message(&state, &activity, &place).await,
        "invoke" => invoke(&state, &activity, &place).await,
        _ => StatusCode::OK.into_response(),
    }
}

/// A text message (possibly with attachments).
async fn message(state: &Inbound, activity: &Activity, place: &Place) -> Response {
    let adapter = &state.adapter;
    let (Some(from), Some(post_id)) = (activity.from.as_ref(), activity.id.as_deref()) else {
        return bad_request("a message needs from and id");
    };
    if from.id == adapter.bot_user_id() || post_id.is_empty() {
        return StatusCode::OK.into_response();
    }
    let store = adapter.store();
    let (rest, mentioned) = strip_mentions(
        activity.text.as_deref().unwrap_or_default(),
        &activity.entities,
        adapter.bot_user_id(),
    );
    // The thread: in a channel the conversation's root (none on the thread's first message);
    // in a chat, the session started there while one is active.
    let (root_id, in_session) = if place.is_channel() {
        let root = place
            .thread_root
            .clone()
            .filter(|root| root.as_str() != post_id);
        let in_session = match &root {
            Some(root) => match store
                .session_by_thread(Platform::Teams, &place.channel_id, root)
                .await
            {
                Ok(session) => session.is_some(),
                Err(e) => {
                    warn!(error = %e, "cannot look up the thread's session");
                    return unavailable("storage is not available; try again");
                }
            },
            None => false,
        };
        (root, in_session)
    } else {
        match store
            .active_sessions_in_channel(Platform::Teams, &place.channel_id)
            .await
        {
            Ok(sessions) => {
                let thread = sessions
                    .into_iter()
                    .rev()
                    .find(|s| !matches!(s.kind, SessionKind::Worker | SessionKind::Reviewer))
                    .map(|s| s.thread_id);
                let in_session = thread.is_some();
                (thread, in_session)
            }
            Err(e) => {
                warn!(error = %e, "cannot look up the chat's session");
                return unavailable("storage is not available; try again");
            }
        }
    };
    let addressed = mentioned || place.conversation_type == "personal";
    let unsupported = unsupported_attachments(&activity.attachments);
    // A message that is only attachments (and mentions) is answered, not delivered.
    let deliver = !rest.is_empty() || (addressed && unsupported.is_empty());
    let text = if addressed {
        addressed_text(&rest, &adapter.config().trigger, in_session)
    } else {
        rest
    };

    let permit = match tokio::time::timeout(ENQUEUE_TIMEOUT, state.events.reserve()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return unavailable("the bot is not taking messages right now"),
        Err(_) => return unavailable("the bot is busy; try again"),
    };
    let user = user_id(from);
    let user_name = from.name.clone().filter(|n| !n.trim().is_empty());
    let message = InboundMessage {
        platform: Platform::Teams,
        channel_id: place.channel_id.clone(),
        post_id: post_id.to_owned(),
        root_id: root_id.clone(),
        user_id: user.clone(),
        user_name: user_name.clone(),
        text,
        created_at: now_ms(),
    };
    // A message to deliver is recorded with its content, so it is handled after a crash too;
    // one that is only answered is taken at once.
    let recorded = if deliver {
        message.record(store).await
    } else {
        store
            .claim_inbound_post(Platform::Teams, post_id, &place.channel_id, now_ms())
            .await
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => return StatusCode::OK.into_response(), // a redelivery
        Err(e) => {
            warn!(error = %e, post = post_id, "cannot record an inbound Teams message");
            return unavailable("storage is not available; try again");
        }
    }
    metrics::counter!(crate::telemetry::names::CHAT_POSTS_RECEIVED_TOTAL, "platform" => "teams")
        .increment(1);
    let record = TeamsUser {
        user_id: user,
        account_id: from.id.clone(),
        name: user_name.unwrap_or_default(),
        last_conversation_id: addressed.then(|| place.channel_id.clone()),
        updated_at: now_ms(),
    };
    if let Err(e) = store.upsert_teams_user(&record).await {
        warn!(error = %e, "cannot record a Teams user");
    }
    let thread = root_id.unwrap_or_else(|| post_id.to_owned());
    adapter.learn_link(post_id, &place.channel_id, &thread);
    if !unsupported.is_empty() && (addressed || in_session) {
        let notice = unsupported_notice(&unsupported, deliver);
        let (adapter, channel) = (Arc::clone(adapter), place.channel_id.clone());
        adapter.clone().spawn(async move {
            if let Err(e) = adapter.post(&channel, Some(&thread), &notice).await {
                warn!(error = %e, "cannot answer a message with attachments");
            }
        });
    }
    if deliver {
        permit.send(ChatEvent::Message(message));
    }
    StatusCode::OK.into_response()
}

/// The click a card action carries.
fn click(
    activity: &Activity,
    place: &Place,
    context: Map<String, Value>,
) -> Option<(CardClick, PostRef)> {
    let from = activity.from.as_ref()?;
    let card = activity.reply_to_id.clone().filter(|id| !id.is_empty())?;
    let post = PostRef {
        channel_id: place.channel_id.clone(),
        root_id: place.thread_root.clone().filter(|root| *root != card),
        post_id: card.clone(),
    };
    let click = CardClick {
        platform: Platform::Teams,
        user_id: user_id(from),
        user_name: from
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| from.id.clone()),
        post_id: card,
        context,
    };
    Some((click, post))
}

/// The conversation a card lives in (to update it for everyone).
fn card_conversation(place: &Place, post: &PostRef) -> String {
    conversation_id(
        &place.channel_id,
        Some(post.thread_id()),
        place.is_channel(),
    )
}

/// An `Action.Submit` click: a `message` whose `value` is the button's data.
async fn submit(state: &Inbound, activity: &Activity, place: &Place) -> Response {
    let adapter = &state.adapter;
    let context = match submit_context(activity.value.as_ref().unwrap_or(&Value::Null)) {
        Ok(context) => context,
        Err(e) => return bad_request(&e),
    };
    let Some((click, post)) = click(activity, place, context) else {
        return bad_request("a card submit needs from and replyToId");
    };
    if let Some(id) = activity.id.as_deref().filter(|id| !id.is_empty()) {
        match adapter
            .store()
            .claim_inbound_post(Platform::Teams, id, &place.channel_id, now_ms())
            .await
        {
            Ok(true) => {}
            Ok(false) => return StatusCode::OK.into_response(),
            Err(e) => {
                warn!(error = %e, "cannot record a card submit");
                return unavailable("storage is not available; try again");
            }
        }
    }
    let Some(handler) = state.clicks.get() else {
        return unavailable("approvals are not available on this instance right now");
    };
    let who = click.user_name.clone();
    let reply = handler.on_click(click).await;
    let notice = match reply {
        Ok(ClickReply::ReplaceCard(card)) => {
            adapter.replace_soon(card_conversation(place, &post), post, card_activity(&card));
            return StatusCode::OK.into_response();
        }
        Ok(ClickReply::Notice(text)) => text,
        Err(ClickError::Unavailable) => {
            return unavailable("approvals are not available right now; try again")
        }
        Err(e) => format!("Your click was not taken: {e}."),
    };
    let (me, channel, thread) = (
        Arc::clone(adapter),
        post.channel_id.clone(),
        post.thread_id().to_owned(),
    );
    adapter.spawn(async move {
        let text = format!("{who}: {notice}");
        if let Err(e) = me.post(&channel, Some(&thread), &text).await {
            warn!(error = %e, "cannot answer a card submit");
        }
    });
    StatusCode::OK.into_response()
}

/// An invoke; `adaptiveCard/action` is an `Action.Execute` click, answered in the response.
async fn invoke(state: &Inbound, activity: &Activity, place: &Place) -> Response {
    if activity.name.as_deref() != Some(ADAPTIVE_CARD_ACTION) {
        return StatusCode::NOT_IMPLEMENTED.into_response();
    }
    let answer = |body: AdaptiveCardInvokeResponse| (StatusCode::OK, Json(body)).into_response();
    let context = match execute_context(activity.value.as_ref()) {
        Ok(context) => context,
        Err(rejected) => {
            return answer(AdaptiveCardInvokeResponse::error(
                400,
                rejected.code,
                &rejected.message,
            ))
        }
    };
    let Some((click, post)) = click(activity, place, context) else {
        return answer(AdaptiveCardInvokeResponse::error(
            400,
            "BadRequest",
            "a card action needs from and replyToId",
        ));
    };
    let Some(handler) = state.clicks.get() else {
        return answer(invoke_error(&ClickError::Unavailable));
    };
    match handler.on_click(click).await {
        Ok(reply) => {
            if let ClickReply::ReplaceCard(card) = &reply {
                state.adapter.replace_soon(
                    card_conversation(place, &post),
                    post,
                    card_activity(card),
                );
            }
            answer(invoke_reply(&reply))
        }
        Err(e) => answer(invoke_error(&e)),
    }
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

fn unavailable(message: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mention(id: &str, shown: &str) -> Entity {
        Entity {
            entity_type: "mention".into(),
            mentioned: Some(ChannelAccount {
                id: id.into(),
                ..ChannelAccount::default()
            }),
            text: Some(shown.into()),
        }
    }

    #[test]
    fn the_bots_mention_is_removed_and_others_are_unwrapped() {
        let entities = [
            mention("28:app", "<at>ApprovalBot</at>"),
            mention("29:olo", "<at>Olo</at>"),
        ];
        let (text, mentioned) = strip_mentions(
            "<at>ApprovalBot</at> please ask <at>Olo</at>\nabout  it",
            &entities,
            "28:app",
        );
        assert!(mentioned);
        assert_eq!(text, "please ask Olo\nabout it");
        let (text, mentioned) = strip_mentions("hello <at>Olo</at>", &entities, "28:app");
        assert!(!mentioned);
        assert_eq!(text, "hello Olo");
    }

    #[test]
    fn an_address_becomes_the_trigger_outside_sessions_only_for_commands_inside() {
        assert_eq!(
            addressed_text("start acme/widgets", "@claude", false),
            "@claude start acme/widgets"
        );
        assert_eq!(addressed_text("", "@claude", false), "@claude");
        assert_eq!(
            addressed_text("@claude status", "@claude", false),
            "@claude status"
        );
        assert_eq!(
            addressed_text("please fix the tests", "@claude", true),
            "please fix the tests"
        );
        assert_eq!(addressed_text("stop", "@claude", true), "@claude stop");
        assert_eq!(addressed_text("!compact", "@claude", true), "!compact");
        assert_eq!(
            addressed_text("status of the build?", "@claude", true),
            "status of the build?"
        );
        assert_eq!(addressed_text("hello", "@claude", false), "@claude hello");
    }

    #[test]
    fn attachments_other_than_the_message_itself_are_named() {
        let html = |content: &str| Attachment {
            content_type: "text/html".into(),
            content: Some(json!(content)),
            ..Attachment::default()
        };
        assert!(unsupported_attachments(&[html("<p>hi</p>")]).is_empty());
        assert_eq!(
            unsupported_attachments(&[html("<p><img src=x></p>")]),
            ["an image"]
        );
        let file = Attachment {
            content_type: "application/vnd.microsoft.teams.file.download.info".into(),
            name: Some("report.pdf".into()),
            ..Attachment::default()
        };
        let image = Attachment {
            content_type: "image/png".into(),
            ..Attachment::default()
        };
        assert_eq!(
            unsupported_attachments(&[file, image.clone(), image]),
            ["the file `report.pdf`", "an image"]
        );
        assert!(unsupported_notice(&["an image".into()], true).contains("not supported yet"));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(
            text in ".{0,200}",
            shown in ".{0,20}",
            conversation in ".{0,60}",
            kind in ".{0,12}",
            html in ".{0,80}",
        ) {
            let entities = [mention("28:app", &shown), mention("29:x", &shown)];
            let (rest, _) = strip_mentions(&text, &entities, "28:app");
            let _ = addressed_text(&rest, "@claude", false);
            let _ = addressed_text(&rest, "@claude", true);
            let _ = unsupported_attachments(&[Attachment {
                content_type: kind.clone(),
                content: Some(json!(html)),
                name: Some(text.clone()),
                ..Attachment::default()
            }]);
            let activity: Activity = serde_json::from_value(json!({
                "type": "message",
                "conversation": { "id": conversation, "conversationType": kind },
                "channelData": { "channel": { "id": html } },
            })).expect("activity");
            if let Some(place) = Place::of(&activity) {
                proptest::prop_assert!(!place.channel_id.contains(";messageid=") || !place.is_channel());
            }
        }
    }

    #[test]
    fn places_follow_the_conversation() {
        let activity: Activity = serde_json::from_value(json!({
            "type":"message","conversation":{"conversationType":"channel","id":"19:c@thread.tacv2;messageid=42"}
        })).expect("activity");
        let place = Place::of(&activity).expect("place");
        assert_eq!(place.channel_id, "19:c@thread.tacv2");
        assert_eq!(place.thread_root.as_deref(), Some("42"));
        let personal: Activity = serde_json::from_value(json!({
            "type":"message","conversation":{"id":"a:1xyz"}
        }))
        .expect("activity");
        let place = Place::of(&personal).expect("place");
        assert_eq!(place.conversation_type, "personal");
        assert_eq!(place.thread_root, None);
        assert!(Place::of(&Activity::default()).is_none());
        assert_eq!(
            user_id(&ChannelAccount {
                id: "29:x".into(),
                aad_object_id: Some("B130C271-D2EB-45F9-83AB-9EB3FE3788BC".into()),
                ..ChannelAccount::default()
            }),
            "b130c271-d2eb-45f9-83ab-9eb3fe3788bc"
        );
    }
}
