//! The Mattermost REST API v4 client.
//!
//! Every call authenticates with `Authorization: Bearer <token>` (the header is marked
//! sensitive so it never appears in debug output). Errors become [`ChatError`]: Mattermost's
//! error body (`AppError`) is parsed into `Api { status, code, message }`, and 429 becomes
//! `RateLimited` with the server's `Retry-After` (or `X-Ratelimit-Reset`).
//!
//! Requests that fail transiently (429, 5xx, network) are retried with capped, jittered
//! exponential backoff; a `Retry-After` replaces the computed delay (capped at
//! [`RetryPolicy::max_retry_after`]). Endpoints and shapes: `shared/reference/wire-formats.md`
//! §1.3, from `server/channels/api4/*.go` in mattermost/mattermost.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use url::Url;

use super::model::{
    AppError, Channel, CreatePost, OrderedSidebarCategories, PatchPost, Post, PostList,
    SidebarCategory, User,
};
use crate::chat::ChatError;

/// How requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 disables retrying).
    pub max_retries: usize,
    /// First backoff delay.
    pub min_delay: Duration,
    /// Largest computed backoff delay.
    pub max_delay: Duration,
    /// Largest `Retry-After` honoured; a longer one is cut to this.
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    /// No retries: for callers that run their own retry loop.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_retries: 0,
        min_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
        max_retry_after: Duration::ZERO,
    };
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// A Mattermost REST client for one server and one bot token. Cheap to clone.
#[derive(Clone)]
pub struct MattermostClient {
    http: reqwest::Client,
    api: Url,
    auth: HeaderValue,
    retry: RetryPolicy,
}

impl std::fmt::Debug for MattermostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MattermostClient")
            .field("api", &self.api.as_str())
            .finish_non_exhaustive()
    }
}

impl MattermostClient {
    /// A client for the server at `base_url` (without `/api/v4`). TLS uses the platform's
    /// trust store, so a private CA installed on the host works.
    ///
    /// # Errors
    /// [`ChatError::Transport`] when the HTTP client cannot be built or the token is not a
    /// valid header value.
    pub fn new(
        base_url: &Url,
        token: &SecretString,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Self, ChatError> {
        let mut api = base_url.clone();
        let path = format!("{}/api/v4/", api.path().trim_end_matches('/'));
        api.set_path(&path);
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .map_err(|_| {
                ChatError::Transport(
                    "the Mattermost token contains characters not allowed in a header".into(),
                )
            })?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("session-manager/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ChatError::Transport(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            api,
            auth,
            retry,
        })
    }

    /// The same client with another retry policy.
    pub fn with_retry(&self, retry: RetryPolicy) -> Self {
        Self {
            retry,
            ..self.clone()
        }
    }

    /// The WebSocket URL of this server (`ws(s)://host/api/v4/websocket`).
    pub fn websocket_url(&self) -> Url {
        let mut url = self.api.clone();
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        // Only fails for URLs that cannot have a scheme change, which http(s) URLs can.
        let _ = url.set_scheme(scheme);
        url.set_path(&format!("{}websocket", url.path()));
        url
    }

    /// The `Authorization` header value, for the WebSocket upgrade.
    pub fn authorization(&self) -> &HeaderValue {
        &self.auth
    }

    /// `GET /users/me`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn me(&self) -> Result<User, ChatError> {
        self.call(Method::GET, "users/me", &[], None).await
    }

    /// `GET /users/{id}`.
    ///
    /// # Errors
    /// [`ChatError`] (404 for an unknown user).
    pub async fn user(&self, user_id: &str) -> Result<User, ChatError> {
        self.call(Method::GET, &format!("users/{}", seg(user_id)), &[], None)
            .await
    }

    /// `GET /users/username/{username}`.
    ///
    /// # Errors
    /// [`ChatError`] (404 for an unknown user).
    pub async fn user_by_username(&self, username: &str) -> Result<User, ChatError> {
        let name = username.trim_start_matches('@');
        self.call(
            Method::GET,
            &format!("users/username/{}", seg(name)),
            &[],
            None,
        )
        .await
    }

    /// `POST /posts`: a root post, or a reply when `root_id` is given. Answers 201.
    ///
    /// Every create carries a fresh `pending_post_id`, the same on each retry of it: the
    /// server de-duplicates creates that repeat one within 30 s and answers with the post the
    /// first made (`deduplicateCreatePost` in `server/channels/app/post.go`), so a create
    /// retried after a lost answer never makes a second post.
    ///
    /// # Errors
    /// [`ChatError`] (400 when the message is too long or `root_id` is not a root post of
    /// that channel).
    pub async fn create_post(&self, post: &CreatePost<'_>) -> Result<Post, ChatError> {
        let mut body = json!(post);
        body["pending_post_id"] = json!(format!("sm:{}", uuid::Uuid::new_v4().simple()));
        self.call(Method::POST, "posts", &[], Some(body)).await
    }

    /// `POST /posts/ephemeral`: a post only `user_id` sees (`{"user_id", "post": {"channel_id",
    /// "message", "root_id"}}`, answered 201). Mattermost gives this to users with the
    /// `create_post_ephemeral` permission (system admins by default).
    ///
    /// # Errors
    /// [`ChatError`] (403 without the permission).
    pub async fn create_ephemeral_post(
        &self,
        user_id: &str,
        post: &CreatePost<'_>,
    ) -> Result<Post, ChatError> {
        self.call(
            Method::POST,
            "posts/ephemeral",
            &[],
            Some(json!({ "user_id": user_id, "post": post })),
        )
        .await
    }

    /// `GET /channels/{id}`; `None` when there is no such channel (or it cannot be read).
    ///
    /// # Errors
    /// [`ChatError`] other than 403/404.
    pub async fn channel(&self, channel_id: &str) -> Result<Option<Channel>, ChatError> {
        let path = format!("channels/{}", seg(channel_id));
        match self.call(Method::GET, &path, &[], None).await {
            Ok(channel) => Ok(Some(channel)),
            Err(e) if matches!(e.status(), Some(403 | 404)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /posts/{id}/patch`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn patch_post(
        &self,
        post_id: &str,
        patch: &PatchPost<'_>,
    ) -> Result<Post, ChatError> {
        self.call(
            Method::PUT,
            &format!("posts/{}/patch", seg(post_id)),
            &[],
            Some(json!(patch)),
        )
        .await
    }

    /// `GET /posts/{id}/thread`: the root and every reply.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn thread(&self, post_id: &str) -> Result<PostList, ChatError> {
        self.call(
            Method::GET,
            &format!("posts/{}/thread", seg(post_id)),
            &[],
            None,
        )
        .await
    }

    /// `GET /channels/{id}/posts?since=<ms>`: posts created or modified after `since_ms`
    /// (at most 1000, per the server).
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn posts_since(
        &self,
        channel_id: &str,
        since_ms: i64,
    ) -> Result<PostList, ChatError> {
        let since = since_ms.to_string();
        self.call(
            Method::GET,
            &format!("channels/{}/posts", seg(channel_id)),
            &[("since", &since)],
            None,
        )
        .await
    }

    /// `POST /channels`: a public (`O`) or private (`P`) channel. Answers 201.
    ///
    /// # Errors
    /// [`ChatError`] (400 for a bad or taken name).
    pub async fn create_channel(
        &self,
        team_id: &str,
        name: &str,
        display_name: &str,
        private: bool,
    ) -> Result<Channel, ChatError> {
        let body = json!({
            "team_id": team_id,
            "name": name,
            "display_name": display_name,
            "type": if private { "P" } else { "O" },
        });
        self.call(Method::POST, "channels", &[], Some(body)).await
    }

    /// `GET /teams/{team}/channels/name/{name}`; `None` when there is no such channel.
    ///
    /// # Errors
    /// [`ChatError`] other than 404.
    pub async fn channel_by_name(
        &self,
        team_id: &str,
        name: &str,
    ) -> Result<Option<Channel>, ChatError> {
        let path = format!("teams/{}/channels/name/{}", seg(team_id), seg(name));
        match self.call(Method::GET, &path, &[], None).await {
            Ok(channel) => Ok(Some(channel)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /channels/{id}/members` (201; adding an existing member is harmless).
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn add_channel_member(
        &self,
        channel_id: &str,
        user_id: &str,
    ) -> Result<(), ChatError> {
        let _: Value = self
            .call(
                Method::POST,
                &format!("channels/{}/members", seg(channel_id)),
                &[],
                Some(json!({ "user_id": user_id })),
            )
            .await?;
        Ok(())
    }

    /// `GET /users/{user}/teams/{team}/channels/categories`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn sidebar_categories(
        &self,
        user_id: &str,
        team_id: &str,
    ) -> Result<OrderedSidebarCategories, ChatError> {
        self.call(Method::GET, &categories_path(user_id, team_id), &[], None)
            .await
    }

    /// `POST /users/{user}/teams/{team}/channels/categories`: a custom category.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn create_sidebar_category(
        &self,
        category: &SidebarCategory,
    ) -> Result<SidebarCategory, ChatError> {
        let path = categories_path(&category.user_id, &category.team_id);
        self.call(Method::POST, &path, &[], Some(json!(category)))
            .await
    }

    /// `PUT /users/{user}/teams/{team}/channels/categories/{id}`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn update_sidebar_category(
        &self,
        category: &SidebarCategory,
    ) -> Result<SidebarCategory, ChatError> {
        let path = format!(
            "{}/{}",
            categories_path(&category.user_id, &category.team_id),
            seg(&category.id)
        );
        self.call(Method::PUT, &path, &[], Some(json!(category)))
            .await
    }

    /// `PUT /users/{user}/teams/{team}/threads/{root}/following`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn follow_thread(
        &self,
        user_id: &str,
        team_id: &str,
        root_id: &str,
    ) -> Result<(), ChatError> {
        let path = format!(
            "users/{}/teams/{}/threads/{}/following",
            seg(user_id),
            seg(team_id),
            seg(root_id)
        );
        let _: Value = self.call(Method::PUT, &path, &[], None).await?;
        Ok(())
    }

    /// `POST /users/{user}/typing`: shows "typing…" in a channel or thread.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn typing(
        &self,
        user_id: &str,
        channel_id: &str,
        parent_id: Option<&str>,
    ) -> Result<(), ChatError> {
        let body = json!({ "channel_id": channel_id, "parent_id": parent_id.unwrap_or_default() });
        let _: Value = self
            .call(
                Method::POST,
                &format!("users/{}/typing", seg(user_id)),
                &[],
                Some(body),
            )
            .await?;
        Ok(())
    }

    /// `POST /reactions`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn add_reaction(
        &self,
        user_id: &str,
        post_id: &str,
        emoji_name: &str,
    ) -> Result<(), ChatError> {
        let body = json!({ "user_id": user_id, "post_id": post_id, "emoji_name": emoji_name });
        let _: Value = self
            .call(Method::POST, "reactions", &[], Some(body))
            .await?;
        Ok(())
    }

    /// `DELETE /users/{user}/posts/{post}/reactions/{emoji}`.
    ///
    /// # Errors
    /// [`ChatError`].
    pub async fn remove_reaction(
        &self,
        user_id: &str,
        post_id: &str,
        emoji_name: &str,
    ) -> Result<(), ChatError> {
        let path = format!(
            "users/{}/posts/{}/reactions/{}",
            seg(user_id),
            seg(post_id),
            seg(emoji_name)
        );
        let _: Value = self.call(Method::DELETE, &path, &[], None).await?;
        Ok(())
    }

    /// One API call with retries.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<T, ChatError> {
        let url = self
            .api
            .join(path)
            .map_err(|e| ChatError::Transport(format!("bad request path {path:?}: {e}")))?;
        let policy = self.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_retries)
            .with_jitter();
        let attempt = || self.once::<T>(method.clone(), url.clone(), query, body.as_ref());
        attempt
            .retry(backoff)
            .when(ChatError::is_transient)
            .adjust(move |err, delay| match (err, delay) {
                (ChatError::RateLimited { retry_after }, Some(_)) => Some((*retry_after).min(policy.max_retry_after)),
                (_, delay) => delay,
            })
            .notify(|err, delay| {
                tracing::warn!(error = %err, retry_in = ?delay, "Mattermost request failed; retrying");
            })
            .await
    }

    async fn once<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<T, ChatError> {
        let mut request = self
            .http
            .request(method, url)
            .header(AUTHORIZATION, self.auth.clone());
        if !query.is_empty() {
            request = request.query(query);
        }
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

/// Turns a non-2xx answer into a [`ChatError`].
fn error_from(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ChatError {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ChatError::RateLimited {
            retry_after: retry_after(headers).unwrap_or(Duration::from_secs(1)),
        };
    }
    let parsed: AppError = serde_json::from_slice(body).unwrap_or_default();
    let message = if parsed.message.is_empty() {
        String::from_utf8_lossy(body).chars().take(200).collect()
    } else {
        parsed.message
    };
    ChatError::Api {
        status: status.as_u16(),
        code: parsed.id,
        message,
    }
}

/// `Retry-After` (whole seconds) or, failing that, `X-Ratelimit-Reset` (seconds until reset).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    [RETRY_AFTER.as_str(), "x-ratelimit-reset"]
        .iter()
        .find_map(|name| {
            headers
                .get(*name)?
                .to_str()
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
        })
}

fn categories_path(user_id: &str, team_id: &str) -> String {
    format!(
        "users/{}/teams/{}/channels/categories",
        seg(user_id),
        seg(team_id)
    )
}

/// Percent-encodes one path segment, so an id can never change the path.
fn seg(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_cannot_escape() {
        assert_eq!(seg("abc"), "abc");
        assert_eq!(seg("../../users/me"), "..%2F..%2Fusers%2Fme");
        assert_eq!(seg("a b?c#d"), "a%20b%3Fc%23d");
    }

    #[test]
    fn errors_are_typed() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            error_from(StatusCode::TOO_MANY_REQUESTS, &headers, b"limit exceeded"),
            ChatError::RateLimited {
                retry_after: Duration::from_secs(7)
            }
        );
        let body = br#"{"id":"api.post.create_post.root_id.app_error","message":"Invalid RootId parameter.","detailed_error":"","request_id":"r","status_code":400}"#;
        assert_eq!(
            error_from(StatusCode::BAD_REQUEST, &HeaderMap::new(), body),
            ChatError::Api {
                status: 400,
                code: "api.post.create_post.root_id.app_error".into(),
                message: "Invalid RootId parameter.".into()
            }
        );
        let e = error_from(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            b"<html>proxy</html>",
        );
        assert!(e.is_transient());
        assert!(
            matches!(e, ChatError::Api { status: 502, ref message, .. } if message.contains("proxy"))
        );
        let mut reset = HeaderMap::new();
        reset.insert("x-ratelimit-reset", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&reset), Some(Duration::from_secs(3)));
    }

    #[test]
    fn urls_are_derived_from_the_base() {
        let client = MattermostClient::new(
            &Url::parse("https://chat.example.com/mm/").expect("url"),
            &SecretString::from("t0ken".to_owned()),
            Duration::from_secs(5),
            RetryPolicy::default(),
        )
        .expect("client");
        assert_eq!(
            client.websocket_url().as_str(),
            "wss://chat.example.com/mm/api/v4/websocket"
        );
        assert!(!format!("{client:?}").contains("t0ken"));
        assert!(!format!("{:?}", client.authorization()).contains("t0ken"));
    }
}
