//! [`ActionCard`]s as Adaptive Cards, and card clicks back (`shared/reference/wire-formats.md`
//! §3.5–3.6, from ACDOCS `universal-action-model.md` and TDOCS `cards-actions.md`,
//! `Work-with-Universal-Actions-for-Adaptive-Cards.md`).
//!
//! A card is version 1.5: a title, the text, and the buttons in an `ActionSet`. Each button is
//! an `Action.Execute` (verb = the action id, `data` = the action's signed context, unchanged)
//! with an `Action.Submit` fallback for older clients whose `data` is the same context plus
//! `"verb"`. A click comes back as an `invoke` `adaptiveCard/action` (Execute) or as a
//! `message` with `value` (Submit); both give the context back as the card carried it.

use serde_json::{json, Map, Value};

use super::model::{AdaptiveCardInvokeResponse, Attachment, ADAPTIVE_CARD_CONTENT_TYPE};
use crate::chat::{ActionCard, ClickError, ClickReply};

/// The Adaptive Card schema URL cards declare.
pub const ADAPTIVE_CARD_SCHEMA: &str = "http://adaptivecards.io/schemas/adaptive-card.json";
/// The card version: `Action.Execute` needs 1.4; Teams documents 1.5.
pub const ADAPTIVE_CARD_VERSION: &str = "1.5";

/// The card's JSON (the `content` of its attachment).
pub fn adaptive_card(card: &ActionCard) -> Value {
    let mut title = json!({
        "type": "TextBlock",
        "text": card.title,
        "weight": "Bolder",
        "size": "Medium",
        "wrap": true,
    });
    if let (Some(color), Some(obj)) = (card.color.as_deref(), title.as_object_mut()) {
        obj.insert("color".into(), Value::String(palette(color).into()));
    }
    let mut body = vec![
        title,
        json!({ "type": "TextBlock", "text": card.text, "wrap": true }),
    ];
    if !card.actions.is_empty() {
        let actions: Vec<Value> = card
            .actions
            .iter()
            .map(|a| {
                let style = match a.style.as_str() {
                    "good" | "primary" => "positive",
                    "danger" => "destructive",
                    _ => "default",
                };
                let mut submit = a.context.clone();
                submit.insert("verb".into(), Value::String(a.id.clone()));
                json!({
                    "type": "Action.Execute",
                    "title": a.label,
                    "verb": a.id,
                    "style": style,
                    "data": a.context,
                    "fallback": {
                        "type": "Action.Submit",
                        "title": a.label,
                        "style": style,
                        "data": submit,
                    },
                })
            })
            .collect();
        body.push(json!({ "type": "ActionSet", "actions": actions }));
    }
    json!({
        "type": "AdaptiveCard",
        "$schema": ADAPTIVE_CARD_SCHEMA,
        "version": ADAPTIVE_CARD_VERSION,
        "body": body,
    })
}

/// The card as a message attachment.
pub fn card_attachment(card: &ActionCard) -> Attachment {
    Attachment {
        content_type: ADAPTIVE_CARD_CONTENT_TYPE.into(),
        content: Some(adaptive_card(card)),
        ..Attachment::default()
    }
}

/// The nearest Adaptive Card text colour to a `#RRGGBB` accent (red → `Attention`, orange and
/// yellow → `Warning`, green → `Good`, anything else → `Accent`).
fn palette(hex: &str) -> &'static str {
    let digits = hex.trim_start_matches('#');
    let channel = |i: usize| {
        digits
            .get(i..i + 2)
            .and_then(|d| u8::from_str_radix(d, 16).ok())
    };
    match (channel(0), channel(2), channel(4)) {
        (Some(r), Some(g), Some(b)) if r > 0xC0 && g < 0x60 && b < 0x60 => "Attention",
        (Some(r), Some(g), Some(b)) if r > 0xC0 && g >= 0x60 && b < 0x60 => "Warning",
        (Some(r), Some(g), Some(b)) if g > 0x80 && r < 0x80 && b < 0x80 => "Good",
        _ => "Accent",
    }
}

/// Why an invoke is not a card click the bot can take; answered with
/// [`AdaptiveCardInvokeResponse::error`] (BBJS `activityHandler.ts` rejects the same two cases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeRejected {
    /// `BadRequest` or `NotSupported`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

/// The context of an `Action.Execute` click: `value.action.data` of an `adaptiveCard/action`
/// invoke (`{"action":{"type":"Action.Execute","verb":…,"data":{…}},"trigger":"manual"}`).
///
/// # Errors
/// [`InvokeRejected`]: no `value` or no `value.action` (`BadRequest`), an action other than
/// `Action.Execute` (`NotSupported`), `data` that is not an object (`BadRequest`).
pub fn execute_context(value: Option<&Value>) -> Result<Map<String, Value>, InvokeRejected> {
    let bad = |message: &str| InvokeRejected {
        code: "BadRequest",
        message: message.to_owned(),
    };
    let action = value
        .and_then(|v| v.get("action"))
        .and_then(Value::as_object)
        .ok_or_else(|| bad("missing value.action"))?;
    if action.get("type").and_then(Value::as_str) != Some("Action.Execute") {
        return Err(InvokeRejected {
            code: "NotSupported",
            message: "only Action.Execute is supported".into(),
        });
    }
    match action.get("data") {
        Some(Value::Object(data)) => Ok(data.clone()),
        None | Some(Value::Null) => Ok(Map::new()),
        Some(_) => Err(bad("value.action.data is not an object")),
    }
}

/// The context of an `Action.Submit` click: the message's `value`, an object.
///
/// # Errors
/// A message when `value` is not an object.
pub fn submit_context(value: &Value) -> Result<Map<String, Value>, String> {
    value
        .as_object()
        .cloned()
        .ok_or_else(|| "the card submit's value is not an object".to_owned())
}

/// The invoke answer for the click handler's reply: the new card, or a message.
pub fn invoke_reply(reply: &ClickReply) -> AdaptiveCardInvokeResponse {
    match reply {
        ClickReply::ReplaceCard(card) => AdaptiveCardInvokeResponse::card(adaptive_card(card)),
        ClickReply::Notice(text) => AdaptiveCardInvokeResponse::message(text),
    }
}

/// The invoke answer for a refused click: its HTTP-like status and a code Teams shows.
pub fn invoke_error(error: &ClickError) -> AdaptiveCardInvokeResponse {
    let (status, code) = match error {
        ClickError::BadRequest(_) => (400, "BadRequest"),
        ClickError::Forbidden => (403, "Forbidden"),
        ClickError::NotFound => (404, "NotFound"),
        ClickError::Unavailable => (503, "ServiceUnavailable"),
    };
    AdaptiveCardInvokeResponse::error(status, code, &error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::CardAction;

    fn card() -> ActionCard {
        let mut context = Map::new();
        context.insert("request_id".into(), json!("r-123"));
        context.insert("action".into(), json!("approve"));
        context.insert("expires".into(), json!(1_700_000_000_000_i64));
        context.insert("signature".into(), json!("abc"));
        ActionCard {
            title: "Network access request".into(),
            text: "Allow **example.com**?".into(),
            actions: vec![CardAction {
                id: "approve".into(),
                label: "Approve".into(),
                style: "good".into(),
                context,
            }],
            callback_url: "http://bot/callback".into(),
            color: Some("#FF8000".into()),
        }
    }

    #[test]
    fn cards_are_version_1_5_with_execute_and_a_submit_fallback() {
        let json = adaptive_card(&card());
        assert_eq!(json["type"], "AdaptiveCard");
        assert_eq!(json["version"], "1.5");
        assert_eq!(json["body"][0]["color"], "Warning");
        let action = &json["body"][2]["actions"][0];
        assert_eq!(action["type"], "Action.Execute");
        assert_eq!(action["verb"], "approve");
        assert_eq!(action["style"], "positive");
        assert_eq!(action["data"]["signature"], "abc");
        assert_eq!(action["data"]["expires"], 1_700_000_000_000_i64);
        assert_eq!(action["fallback"]["type"], "Action.Submit");
        assert_eq!(action["fallback"]["data"]["verb"], "approve");
        assert_eq!(action["fallback"]["data"]["request_id"], "r-123");
        let decided = ActionCard {
            actions: Vec::new(),
            color: None,
            ..card()
        };
        let json = adaptive_card(&decided);
        assert_eq!(json["body"].as_array().map(Vec::len), Some(2), "no buttons");
    }

    #[test]
    fn clicks_come_back_with_the_context() {
        let value = json!({"action":{"type":"Action.Execute","id":"","verb":"approve","data":{"request_id":"r-123"}},"trigger":"manual"});
        let context = execute_context(Some(&value)).expect("execute");
        assert_eq!(context["request_id"], "r-123");
        assert_eq!(execute_context(None).expect_err("none").code, "BadRequest");
        let submit = json!({"action":{"type":"Action.Submit","data":{}}});
        assert_eq!(
            execute_context(Some(&submit)).expect_err("submit").code,
            "NotSupported"
        );
        let bad = json!({"action":{"type":"Action.Execute","data":"x"}});
        assert_eq!(
            execute_context(Some(&bad)).expect_err("data").code,
            "BadRequest"
        );
        assert!(submit_context(&json!("x")).is_err());
        assert_eq!(
            submit_context(&json!({"verb":"deny","request_id":"r"})).expect("submit")["verb"],
            "deny"
        );
        assert_eq!(palette("#00C000"), "Good");
        assert_eq!(palette("#FF0000"), "Attention");
        assert_eq!(palette("nonsense"), "Accent");
    }
}
