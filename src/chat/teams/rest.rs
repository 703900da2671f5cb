//! The bot's side of the Bot Framework REST API: its token, and the Connector client.
//!
//! The token comes from an OAuth client-credentials request (`shared/reference/wire-formats.md`
//! §3.1, BDOCS `bot-framework-rest-connector-authentication.md`): `POST <token url>` with
//! `grant_type=client_credentials&client_id=<app id>&client_secret=<password>&scope=https://api.botframework.com/.default`.
//! It is cached and fetched again [`TOKEN_REFRESH_MARGIN`] before it expires, or at once when
//! the Connector answers 401.
//!
//! Connector calls (§3.4, BF `botframework-channel.json`) go to the conversation's service URL
//! (`{serviceUrl}v3/conversations/{conversationId}/activities/{activityId}`, ids
//! percent-encoded: they contain `:`, `@` and `;`), with `Authorization: Bearer <token>`. The
//! service URL is only ever one an inbound activity brought under a verified token, so the
//! bot's token goes nowhere else. Errors become [`ChatError`]: the `ErrorResponse` body gives
//! `Api { status, code, message }`, and 429 gives `RateLimited` with `Retry-After`. Transient
//! failures (429, 5xx, network) are retried with capped, jittered exponential backoff, a
//! `Retry-After` replacing the computed delay (capped at [`RetryPolicy::max_retry_after`]).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::model::{
    Activity, ConversationParameters, ConversationResourceResponse, ErrorResponse,
    ResourceResponse, TokenResponse,
};
use crate::chat::mattermost::rest::RetryPolicy;
use crate::chat::ChatError;

/// The scope of a token for the Bot Framework Connector.
pub const BOT_FRAMEWORK_SCOPE: &str = "https://api.botframework.com/.default";
/// A token is fetched again this long before it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);

struct CachedToken {
    header: HeaderValue,
    /// When to fetch a new one (expiry minus the margin).
    refresh_at: Instant,
}

/// The bot's Connector token, fetched by client credentials and cached. Cheap to share.
pub struct TokenSource {
    http: reqwest::Client,
    url: Url,
    app_id: String,
    password: SecretString,
    cached: Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("url", &self.url.as_str())
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A token source for `app_id` / `password` at the token endpoint `url`.
    pub fn new(http: reqwest::Client, url: Url, app_id: &str, password: SecretString) -> Self {
        Self {
            http,
            url,
            app_id: app_id.to_owned(),
            password,
            cached: Mutex::new(None),
        }
    }

    /// The `Authorization` header value (`Bearer <token>`, marked sensitive), from the cache
    /// while it is fresh.
    ///
    /// # Errors
    /// [`ChatError`] when the token endpoint refuses or cannot be reached (no retry here; the
    /// Connector call that needed it is retried).
    pub async fn header(&self) -> Result<HeaderValue, ChatError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.header.clone());
            }
        }
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.app_id)
            .append_pair("client_secret", self.password.expose_secret())
            .append_pair("scope", BOT_FRAMEWORK_SCOPE)
            .finish();
        let response = self
            .http
            .post(self.url.clone())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                ChatError::Transport(format!(
                    "token endpoint: {}",
                    crate::chat::transport_cause(e)
                ))
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| {
            ChatError::Transport(format!(
                "token endpoint: {}",
                crate::chat::transport_cause(e)
            ))
        })?;
        if !status.is_success() {
            // OAuth errors are `{"error":"invalid_client","error_description":…}`.
            let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let code = parsed["error"].as_str().unwrap_or_default().to_owned();
            let message = parsed["error_description"]
                .as_str()
                .map(|d| d.lines().next().unwrap_or_default().to_owned())
                .unwrap_or_default();
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(ChatError::RateLimited {
                    retry_after: retry_after(&headers).unwrap_or(Duration::from_secs(1)),
                });
            }
            return Err(ChatError::Api {
                status: status.as_u16(),
                code,
                message: format!("the token endpoint refused the bot's credentials: {message}"),
            });
        }
        let token: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| ChatError::Decode(format!("token endpoint answer: {e}")))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| ChatError::Decode("the token is not a valid header value".into()))?;
        header.set_sensitive(true);
        let lifetime = Duration::from_secs(token.expires_in);
        // Refresh early: the margin, or half the lifetime of a short-lived token.
        let margin = TOKEN_REFRESH_MARGIN.min(lifetime / 2);
        *cached = Some(CachedToken {
            header: header.clone(),
            refresh_at: Instant::now() + lifetime - margin,
        });
        Ok(header)
    }

    /// Forgets the cached token (after the Connector refused it).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

/// The Connector REST client for one bot. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnectorClient {
    http: reqwest::Client,
    tokens: std::sync::Arc<TokenSource>,
    retry: RetryPolicy,
}

impl ConnectorClient {
    /// A client that authenticates with `tokens`.
    pub fn new(
        http: reqwest::Client,
        tokens: std::sync::Arc<TokenSource>,
        retry: RetryPolicy,
    ) -> Self {
        Self {
            http,
            tokens,
            retry,
        }
    }

    /// Gets a Connector token (from the token endpoint, or the cache): whether the bot's
    /// credentials work, for the line `serve` logs at start.
    ///
    /// # Errors
    /// [`ChatError`] as [`TokenSource::header`].
    pub async fn check_token(&self) -> Result<(), ChatError> {
        self.tokens.header().await.map(|_| ())
    }

    /// `POST {serviceUrl}v3/conversations` (CreateConversation): a new thread in a channel.
    ///
    /// # Errors
    /// [`ChatError`] after retries.
    pub async fn create_conversation(
        &self,
        service_url: &str,
        params: &ConversationParameters,
    ) -> Result<ConversationResourceResponse, ChatError> {
        let url = endpoint(service_url, &["v3", "conversations"])?;
        self.call(
            Method::POST,
            url,
            Some(serde_json::to_value(params).unwrap_or(Value::Null)),
        )
        .await
    }

    /// `POST {serviceUrl}v3/conversations/{conversationId}/activities` (SendToConversation).
    ///
    /// # Errors
    /// [`ChatError`] after retries.
    pub async fn send_to_conversation(
        &self,
        service_url: &str,
        conversation_id: &str,
        activity: &Activity,
    ) -> Result<ResourceResponse, ChatError> {
        let url = endpoint(
            service_url,
            &["v3", "conversations", conversation_id, "activities"],
        )?;
        self.call(Method::POST, url, Some(to_json(activity))).await
    }

    /// `POST {serviceUrl}v3/conversations/{conversationId}/activities/{activityId}`
    /// (ReplyToActivity).
    ///
    /// # Errors
    /// [`ChatError`] after retries.
    pub async fn reply_to_activity(
        &self,
        service_url: &str,
        conversation_id: &str,
        activity_id: &str,
        activity: &Activity,
    ) -> Result<ResourceResponse, ChatError> {
        let url = endpoint(
            service_url,
            &[
                "v3",
                "conversations",
                conversation_id,
                "activities",
                activity_id,
            ],
        )?;
        self.call(Method::POST, url, Some(to_json(activity))).await
    }

    /// `PUT {serviceUrl}v3/conversations/{conversationId}/activities/{activityId}`
    /// (UpdateActivity): replaces the message's text or attachments.
    ///
    /// # Errors
    /// [`ChatError`] after retries.
    pub async fn update_activity(
        &self,
        service_url: &str,
        conversation_id: &str,
        activity_id: &str,
        activity: &Activity,
    ) -> Result<ResourceResponse, ChatError> {
        let url = endpoint(
            service_url,
            &[
                "v3",
                "conversations",
                conversation_id,
                "activities",
                activity_id,
            ],
        )?;
        self.call(Method::PUT, url, Some(to_json(activity))).await
    }

    /// `DELETE {serviceUrl}v3/conversations/{conversationId}/activities/{activityId}`.
    ///
    /// # Errors
    /// [`ChatError`] after retries.
    pub async fn delete_activity(
        &self,
        service_url: &str,
        conversation_id: &str,
        activity_id: &str,
    ) -> Result<(), ChatError> {
        let url = endpoint(
            service_url,
            &[
                "v3",
                "conversations",
                conversation_id,
                "activities",
                activity_id,
            ],
        )?;
        let _: Value = self.call(Method::DELETE, url, None).await?;
        Ok(())
    }

    /// One call with retries; a 401 drops the cached token and counts as transient once.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
    ) -> Result<T, ChatError> {
        let policy = self.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_retries)
            .with_jitter();
        let refused_once = std::sync::atomic::AtomicBool::new(false);
        let attempt = || async {
            match self
                .once::<T>(method.clone(), url.clone(), body.as_ref())
                .await
            {
                Err(ChatError::Api { status: 401, .. })
                    if !refused_once.swap(true, std::sync::atomic::Ordering::SeqCst) =>
                {
                    self.tokens.invalidate().await;
                    Err(ChatError::Transport(
                        "the Connector refused the token; fetching a new one".into(),
                    ))
                }
                other => other,
            }
        };
        attempt
            .retry(backoff)
            .when(ChatError::is_transient)
            .adjust(move |err, delay| match (err, delay) {
                (ChatError::RateLimited { retry_after }, Some(_)) => {
                    Some((*retry_after).min(policy.max_retry_after))
                }
                (_, delay) => delay,
            })
            .notify(|err, delay| {
                tracing::warn!(error = %err, retry_in = ?delay, "Teams Connector request failed; retrying");
            })
            .await
    }

    async fn once<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<T, ChatError> {
        let auth = self.tokens.header().await?;
        let mut request = self.http.request(method, url).header(AUTHORIZATION, auth);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ChatError::Transport(crate::chat::transport_cause(e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ChatError::Transport(crate::chat::transport_cause(e)))?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body).map_err(|e| ChatError::Decode(format!("{e}")));
        }
        Err(error_from(status, &headers, &bytes))
    }
}

fn to_json(activity: &Activity) -> Value {
    serde_json::to_value(activity).unwrap_or(Value::Null)
}

/// `{serviceUrl}` joined with percent-encoded path segments.
///
/// # Errors
/// [`ChatError::Transport`] when the service URL is not an http(s) URL.
pub fn endpoint(service_url: &str, segments: &[&str]) -> Result<Url, ChatError> {
    let mut url = Url::parse(service_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| ChatError::Transport(format!("not a service URL: {service_url:?}")))?;
    let base = url.path().trim_end_matches('/').to_owned();
    let tail: Vec<String> = segments.iter().map(|s| seg(s)).collect();
    url.set_path(&format!("{base}/{}", tail.join("/")));
    url.set_query(None);
    Ok(url)
}

/// Turns a non-2xx answer into a [`ChatError`].
fn error_from(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ChatError {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ChatError::RateLimited {
            retry_after: retry_after(headers).unwrap_or(Duration::from_secs(1)),
        };
    }
    let parsed: ErrorResponse = serde_json::from_slice(body).unwrap_or_default();
    let message = if parsed.error.message.is_empty() {
        String::from_utf8_lossy(body).chars().take(200).collect()
    } else {
        parsed.error.message
    };
    ChatError::Api {
        status: status.as_u16(),
        code: parsed.error.code,
        message,
    }
}

/// `Retry-After` in whole seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Percent-encodes one path segment (everything but unreserved characters), so an id can
/// never change the path.
fn seg(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_are_encoded_into_one_segment() {
        let url = endpoint(
            "https://smba.trafficmanager.net/amer/",
            &[
                "v3",
                "conversations",
                "19:abc@thread.tacv2;messageid=1611060744833",
                "activities",
                "1611060744833",
            ],
        )
        .expect("url");
        assert_eq!(
            url.as_str(),
            "https://smba.trafficmanager.net/amer/v3/conversations/19%3Aabc%40thread.tacv2%3Bmessageid%3D1611060744833/activities/1611060744833"
        );
        let url =
            endpoint("http://127.0.0.1:9", &["v3", "conversations", "../x?y#z"]).expect("url");
        assert_eq!(url.path(), "/v3/conversations/..%2Fx%3Fy%23z");
        assert!(endpoint("file:///etc/", &["v3"]).is_err());
        assert!(endpoint("not a url", &["v3"]).is_err());
    }

    #[test]
    fn errors_are_typed() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(
            error_from(StatusCode::TOO_MANY_REQUESTS, &headers, b""),
            ChatError::RateLimited {
                retry_after: Duration::from_secs(3)
            }
        );
        let body =
            br#"{"error":{"code":"ConversationNotFound","message":"Conversation not found."}}"#;
        assert_eq!(
            error_from(StatusCode::NOT_FOUND, &HeaderMap::new(), body),
            ChatError::Api {
                status: 404,
                code: "ConversationNotFound".into(),
                message: "Conversation not found.".into()
            }
        );
        assert!(error_from(StatusCode::BAD_GATEWAY, &HeaderMap::new(), b"x").is_transient());
    }
}
