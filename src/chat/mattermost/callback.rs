//! Button clicks from Mattermost interactive messages: the body Mattermost POSTs to a button's
//! integration URL (`model.PostActionIntegrationRequest`) becomes a platform-neutral
//! [`CardClick`], and the handler's [`ClickReply`] becomes Mattermost's
//! `model.PostActionIntegrationResponse` (`server/public/model/integration_action.go`; see
//! `shared/reference/wire-formats.md` §1, "What Mattermost POSTs to `integration.url`").
//!
//! Mattermost signs nothing: the bot's own HMAC in the button context is what the click
//! handler trusts. Mattermost counts a click only when the answer is HTTP 200, so a refusal of
//! a well-formed click is a 200 with an ephemeral notice; a malformed body is a 400, a bad
//! signature a 403.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::adapter::card_props;
use crate::chat::{CardClick, ClickError, ClickHandlers, ClickReply};
use crate::store::Platform;

/// The path Mattermost posts clicks to (`SM_CALLBACK_URL` points here).
pub const CALLBACK_PATH: &str = "/callback";

/// The parts of `model.PostActionIntegrationRequest` the bot reads.
#[derive(Debug, Clone, Deserialize)]
struct PostActionIntegrationRequest {
    user_id: String,
    #[serde(default)]
    user_name: String,
    post_id: String,
    #[serde(default)]
    context: Map<String, Value>,
}

/// Parses a click body.
///
/// # Errors
/// What is wrong with the body (the JSON path of the bad field), for a 400 answer.
pub fn parse_click(body: &[u8]) -> Result<CardClick, String> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let request: PostActionIntegrationRequest = serde_path_to_error::deserialize(&mut json)
        .map_err(|e| format!("invalid callback body: {e}"))?;
    Ok(CardClick {
        platform: Platform::Mattermost,
        user_id: request.user_id,
        user_name: request.user_name,
        post_id: request.post_id,
        context: request.context,
    })
}

/// A reply as `model.PostActionIntegrationResponse`: an ephemeral notice, or an `update` whose
/// `props` replace the card (props are always sent, so the buttons go away).
pub fn render_reply(reply: &ClickReply) -> Value {
    match reply {
        ClickReply::Notice(text) => json!({ "ephemeral_text": text }),
        ClickReply::ReplaceCard(card) => {
            json!({ "update": { "message": "", "props": card_props(card) } })
        }
    }
}

/// The route Mattermost posts clicks to, answered by whatever handler `clicks` holds (503
/// before there is one: a standby, or an instance still connecting).
pub fn routes(clicks: ClickHandlers) -> Router {
    Router::new()
        .route(CALLBACK_PATH, post(callback))
        .with_state(clicks)
}

/// `POST /callback`: parse (400), hand to the handler, answer in Mattermost's form.
async fn callback(State(clicks): State<ClickHandlers>, body: Bytes) -> Response {
    let click = match parse_click(&body) {
        Ok(click) => click,
        Err(reason) => return error_response(StatusCode::BAD_REQUEST, &reason),
    };
    let Some(handler) = clicks.get() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "approvals are not available on this instance right now (starting, or a standby)",
        );
    };
    match handler.on_click(click).await {
        Ok(reply) => (StatusCode::OK, Json(render_reply(&reply))).into_response(),
        Err(e) => {
            let status = match e {
                ClickError::BadRequest(_) => StatusCode::BAD_REQUEST,
                ClickError::Forbidden => StatusCode::FORBIDDEN,
                ClickError::NotFound => StatusCode::NOT_FOUND,
                ClickError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            };
            error_response(status, &e.to_string())
        }
    }
}

fn error_response(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}
