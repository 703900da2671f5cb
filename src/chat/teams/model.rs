//! Bot Framework JSON objects, as the Connector and Teams send and accept them.
//!
//! Shapes follow `shared/reference/wire-formats.md` §3, which quotes BF
//! `specs/botframework-protocol/botframework-channel.json` (swagger v3.1.12: `Activity`,
//! `ChannelAccount`, `ConversationAccount`, `ConversationParameters`, `ResourceResponse`,
//! `ErrorResponse`), TDOCS `conversation-messages.md` (Teams `channelData`) and ACDOCS
//! `universal-action-model.md` (`AdaptiveCardInvokeResponse`). Field names are camelCase on the
//! wire. Only the fields the bot uses are typed; unknown fields are ignored on input, and every
//! optional field is left out on output.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The content type of an Adaptive Card attachment and of an invoke response carrying a card.
pub const ADAPTIVE_CARD_CONTENT_TYPE: &str = "application/vnd.microsoft.card.adaptive";
/// The spelling of the card content type some Teams documents use; accepted on input.
pub const ADAPTIVE_CARD_CONTENT_TYPE_ALT: &str = "application/vnd.microsoft.adaptive.card";
/// An invoke response that shows a message instead of a card.
pub const INVOKE_MESSAGE_TYPE: &str = "application/vnd.microsoft.activity.message";
/// An invoke response that reports an error.
pub const INVOKE_ERROR_TYPE: &str = "application/vnd.microsoft.error";
/// The invoke `name` of an `Action.Execute` click.
pub const ADAPTIVE_CARD_ACTION: &str = "adaptiveCard/action";

/// An activity (`Activity`): a message, an invoke, a typing indicator, … in either direction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    /// `message`, `invoke`, `typing`, `conversationUpdate`, `messageReaction`, …
    #[serde(rename = "type", default)]
    pub activity_type: String,
    /// Its id (the message id in Teams; `f:…` for invokes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When it was sent (ISO 8601, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// Base URL of the Connector for this conversation, e.g.
    /// `https://smba.trafficmanager.net/amer/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    /// The channel: `msteams` for Teams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<String>,
    /// The sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ChannelAccount>,
    /// The conversation (in a Teams channel thread: `<channel>;messageid=<root>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationAccount>,
    /// The receiver (the bot, `28:<app id>`, on inbound activities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<ChannelAccount>,
    /// `plain`, `markdown` or `xml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_format: Option<String>,
    /// The text (inbound mentions appear as `<at>Name</at>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Attachments: cards, files, images, and Teams' `text/html` rendering of the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// Entities: mentions, client info, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<Entity>,
    /// Teams' channel data (`channel`, `team`, `tenant`); kept as JSON, read with
    /// [`TeamsChannelData::from_value`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_data: Option<Value>,
    /// The activity this one answers; on card actions the message that holds the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to_id: Option<String>,
    /// The value of a card submit (`message`) or an invoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The invoke name, e.g. `adaptiveCard/action`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A user or bot account (`ChannelAccount`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelAccount {
    /// Teams id: `29:…` for users, `28:<app id>` for bots.
    #[serde(default)]
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The user's Azure AD object id (a GUID), what approvers are matched by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad_object_id: Option<String>,
}

/// A conversation (`ConversationAccount`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationAccount {
    /// Id: a channel thread `19:…@thread.tacv2;messageid=<root>`, a personal chat `a:…`, a
    /// group chat `19:…@thread.v2`.
    #[serde(default)]
    pub id: String,
    /// Whether more than two accounts take part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_group: Option<bool>,
    /// `channel`, `personal` or `groupChat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_type: Option<String>,
    /// The tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Display name, when Teams sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An attachment (`Attachment`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// MIME type, e.g. [`ADAPTIVE_CARD_CONTENT_TYPE`], `image/png`, `text/html`,
    /// `application/vnd.microsoft.teams.file.download.info`, `reference`.
    #[serde(default)]
    pub content_type: String,
    /// Where the content is, for files and images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_url: Option<String>,
    /// Inline content (a card's JSON, the HTML of a message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// File name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An entity (`Entity`); mentions carry `mentioned` and `text`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    /// `mention`, `clientInfo`, …
    #[serde(rename = "type", default)]
    pub entity_type: String,
    /// Who is mentioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mentioned: Option<ChannelAccount>,
    /// The mention as it appears in the text, e.g. `<at>ApprovalBot</at>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// The parts of Teams' `channelData` the bot reads (TDOCS `conversation-messages.md`, "Teams
/// channel data"). `teamsChannelId`/`teamsTeamId` are deprecated and read only as a fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeamsChannelData {
    /// `channel.id` (or `teamsChannelId`).
    pub channel_id: Option<String>,
    /// `channel.name`, when sent.
    pub channel_name: Option<String>,
    /// `team.id` (or `teamsTeamId`).
    pub team_id: Option<String>,
    /// `tenant.id`.
    pub tenant_id: Option<String>,
}

impl TeamsChannelData {
    /// Reads the known fields from `channelData`; anything missing or of another type is
    /// `None` (never an error).
    pub fn from_value(value: Option<&Value>) -> Self {
        let text = |path: &[&str]| -> Option<String> {
            let mut v = value?;
            for key in path {
                v = v.get(key)?;
            }
            v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
        };
        Self {
            channel_id: text(&["channel", "id"]).or_else(|| text(&["teamsChannelId"])),
            channel_name: text(&["channel", "name"]),
            team_id: text(&["team", "id"]).or_else(|| text(&["teamsTeamId"])),
            tenant_id: text(&["tenant", "id"]),
        }
    }
}

/// The body of `POST {serviceUrl}v3/conversations` (`ConversationParameters`), as BBJS
/// `teamsInfo.ts` `sendMessageToTeamsChannel` builds it for a new channel thread.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationParameters {
    /// `true` for a channel.
    pub is_group: bool,
    /// `{"channel":{"id":"19:…@thread.tacv2"}}`.
    pub channel_data: Value,
    /// The thread's first message.
    pub activity: Activity,
    /// The tenant, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
}

/// The answer to CreateConversation (`ConversationResourceResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationResourceResponse {
    /// The new conversation: `<channel>;messageid=<first message id>` for a channel thread.
    #[serde(default)]
    pub id: String,
    /// The first message's id.
    #[serde(default)]
    pub activity_id: Option<String>,
    /// The service URL to use for it.
    #[serde(default)]
    pub service_url: Option<String>,
}

/// The answer to a send, reply or update (`ResourceResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ResourceResponse {
    /// The activity's id.
    #[serde(default)]
    pub id: String,
}

/// The Connector's error body (`ErrorResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    #[serde(default)]
    pub error: ErrorBody,
}

/// `ErrorResponse.error`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ErrorBody {
    /// E.g. `ConversationNotFound`, `Throttled`, `MessageSizeTooBig`.
    #[serde(default)]
    pub code: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
}

/// The token endpoint's answer to a client-credentials request (§3.1):
/// `{"token_type":"Bearer","expires_in":3600,"ext_expires_in":3600,"access_token":"eyJ…"}`.
#[derive(Clone, Deserialize)]
pub struct TokenResponse {
    /// `Bearer`.
    #[serde(default)]
    pub token_type: String,
    /// Lifetime in seconds.
    #[serde(default)]
    pub expires_in: u64,
    /// The token (a secret: never logged; `Debug` hides it).
    pub access_token: String,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// OpenID metadata (§3.2 step 2): where the signing keys are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OpenIdMetadata {
    /// `https://api.botframework.com`.
    #[serde(default)]
    pub issuer: String,
    /// The JWKS URL.
    pub jwks_uri: String,
    /// `["RS256"]`.
    #[serde(default)]
    pub id_token_signing_alg_values_supported: Vec<String>,
}

/// A JSON Web Key Set (§3.2 step 3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct JwkSet {
    /// The keys; entries that are not objects are skipped by the reader.
    #[serde(default)]
    pub keys: Vec<Value>,
}

/// One key of the Bot Framework's JWKS: a standard RSA JWK plus `endorsements`, the channels
/// the key may sign for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct BotFrameworkJwk {
    /// `RSA`.
    #[serde(default)]
    pub kty: String,
    /// Key id, matched against the token header's `kid`.
    #[serde(default)]
    pub kid: String,
    /// Modulus (base64url).
    #[serde(default)]
    pub n: String,
    /// Exponent (base64url), usually `AQAB`.
    #[serde(default)]
    pub e: String,
    /// Channels the key is endorsed for, e.g. `["msteams", …]`.
    #[serde(default)]
    pub endorsements: Option<Vec<String>>,
}

/// The body of an answer to an `adaptiveCard/action` invoke (`AdaptiveCardInvokeResponse`):
/// `{"statusCode":200,"type":"application/vnd.microsoft.card.adaptive","value":{…card…}}`, a
/// message (`type` [`INVOKE_MESSAGE_TYPE`], `value` a string) or an error (`type`
/// [`INVOKE_ERROR_TYPE`], `value` `{"code","message"}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdaptiveCardInvokeResponse {
    /// 200 for a card or a message; 400, 403, 404, 500 or 503 for an error.
    pub status_code: u16,
    /// What `value` is.
    #[serde(rename = "type")]
    pub response_type: String,
    /// The card, the message, or the error.
    pub value: Value,
}

impl AdaptiveCardInvokeResponse {
    /// A card shown in place of the clicked one.
    pub fn card(card: Value) -> Self {
        Self {
            status_code: 200,
            response_type: ADAPTIVE_CARD_CONTENT_TYPE.into(),
            value: card,
        }
    }

    /// A message shown to the clicking user.
    pub fn message(text: &str) -> Self {
        Self {
            status_code: 200,
            response_type: INVOKE_MESSAGE_TYPE.into(),
            value: Value::String(text.to_owned()),
        }
    }

    /// An error (BBJS `createAdaptiveCardInvokeErrorResponse`).
    pub fn error(status_code: u16, code: &str, message: &str) -> Self {
        let mut value = Map::new();
        value.insert("code".into(), Value::String(code.to_owned()));
        value.insert("message".into(), Value::String(message.to_owned()));
        Self {
            status_code,
            response_type: INVOKE_ERROR_TYPE.into(),
            value: Value::Object(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_reference_channel_message_reads() {
        let raw = json!({"type":"message","id":"1611060790123","timestamp":"2024-01-19T12:53:10.123Z",
            "serviceUrl":"https://smba.trafficmanager.net/amer/","channelId":"msteams",
            "from":{"id":"29:1aBjVi5Mw","name":"Olo Brockhouse","aadObjectId":"b130c271-d2eb-45f9-83ab-9eb3fe3788bc"},
            "conversation":{"isGroup":true,"conversationType":"channel","tenantId":"0d9b645f",
                "id":"19:6decf54d86d945e4b3924b63a9161a78@thread.tacv2;messageid=1611060744833"},
            "recipient":{"id":"28:app","name":"ApprovalBot"},
            "textFormat":"plain","text":"<at>ApprovalBot</at> please allow example.com",
            "entities":[{"type":"mention","mentioned":{"id":"28:app","name":"ApprovalBot"},"text":"<at>ApprovalBot</at>"},
                        {"type":"clientInfo","locale":"en-US"}],
            "channelData":{"teamsChannelId":"19:old@thread.tacv2","channel":{"id":"19:6decf54d86d945e4b3924b63a9161a78@thread.tacv2"},
                "team":{"id":"19:team@thread.tacv2"},"tenant":{"id":"0d9b645f"}},
            "replyToId":"1611060744833","locale":"en-US"});
        let activity: Activity = serde_json::from_value(raw).expect("reads");
        assert_eq!(activity.entities.len(), 2);
        assert_eq!(
            activity
                .from
                .as_ref()
                .and_then(|f| f.aad_object_id.as_deref()),
            Some("b130c271-d2eb-45f9-83ab-9eb3fe3788bc")
        );
        let data = TeamsChannelData::from_value(activity.channel_data.as_ref());
        assert_eq!(
            data.channel_id.as_deref(),
            Some("19:6decf54d86d945e4b3924b63a9161a78@thread.tacv2"),
            "channel.id wins over the deprecated teamsChannelId"
        );
        assert_eq!(data.team_id.as_deref(), Some("19:team@thread.tacv2"));
        assert_eq!(data.tenant_id.as_deref(), Some("0d9b645f"));
        assert_eq!(
            TeamsChannelData::from_value(Some(&json!("x"))),
            TeamsChannelData::default()
        );
    }

    #[test]
    fn outbound_activities_leave_out_what_is_unset() {
        let reply = Activity {
            activity_type: "message".into(),
            text: Some("hi".into()),
            text_format: Some("markdown".into()),
            ..Activity::default()
        };
        assert_eq!(
            serde_json::to_value(&reply).expect("json"),
            json!({"type":"message","textFormat":"markdown","text":"hi"})
        );
        assert_eq!(
            serde_json::to_value(AdaptiveCardInvokeResponse::error(400, "BadRequest", "no"))
                .expect("json"),
            json!({"statusCode":400,"type":"application/vnd.microsoft.error","value":{"code":"BadRequest","message":"no"}})
        );
        let token: TokenResponse = serde_json::from_value(json!({"token_type":"Bearer","expires_in":3600,"ext_expires_in":3600,"access_token":"eyJsecret"})).expect("token");
        assert!(!format!("{token:?}").contains("eyJsecret"));
    }
}
