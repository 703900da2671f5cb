//! Verifying the Bot Framework's token on every inbound request (`POST /api/messages`).
//!
//! What is checked, in this order (`shared/reference/wire-formats.md` §3.2, from BDOCS
//! `bot-framework-rest-connector-authentication.md` and BBJS `auth/channelValidation.ts`,
//! `auth/jwtTokenExtractor.ts`, `auth/endorsementsValidator.ts`):
//!
//! 1. `Authorization: Bearer <JWT>` is present and uses the `Bearer` scheme;
//! 2. the header's `alg` is RS256, RS384 or RS512 and it names a `kid`;
//! 3. the key with that `kid` is in the issuer's JWKS (found through the OpenID metadata at
//!    `SM_TEAMS_OPENID_METADATA_URL`); keys are cached, refreshed when older than
//!    [`AuthConfig::max_key_age`], and refetched when an unknown `kid` arrives, at most once
//!    per [`AuthConfig::refresh_interval`];
//! 4. the key is endorsed for `msteams` (and for the activity's `channelId`, when it names
//!    another one);
//! 5. the RS signature, `iss == https://api.botframework.com`, `aud == <app id>`, and `exp` /
//!    `nbf` with [`AuthConfig::clock_skew`] (5 minutes) of leeway;
//! 6. the `serviceurl` claim equals the activity's `serviceUrl` exactly.
//!
//! Each failure is one [`AuthError`] variant; the route answers 401 for all of them except
//! [`AuthError::KeysUnavailable`] (503: the bot cannot check, the caller did nothing wrong).
//! Neither the token nor any part of it is ever logged or put into an error.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};
use url::Url;

use super::model::{BotFrameworkJwk, JwkSet, OpenIdMetadata};

/// The issuer of tokens the Bot Framework Connector sends (BBJS
/// `AuthenticationConstants.ToBotFromChannelTokenIssuer`).
pub const BOT_FRAMEWORK_ISSUER: &str = "https://api.botframework.com";
/// The channel id, and the endorsement a key needs, for Teams.
pub const TEAMS_CHANNEL: &str = "msteams";

/// How inbound tokens are checked.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The bot's app id: the only accepted `aud`.
    pub app_id: String,
    /// OpenID metadata URL (`SM_TEAMS_OPENID_METADATA_URL`).
    pub openid_metadata_url: Url,
    /// The only accepted `iss` ([`BOT_FRAMEWORK_ISSUER`]).
    pub issuer: String,
    /// Leeway for `exp` and `nbf` (5 minutes in the SDK).
    pub clock_skew: Duration,
    /// Least time between two fetches of the keys caused by unknown `kid`s.
    pub refresh_interval: Duration,
    /// Keys older than this are fetched again before use (the SDK keeps them up to 5 days).
    pub max_key_age: Duration,
    /// Timeout of each metadata or JWKS request.
    pub request_timeout: Duration,
}

impl AuthConfig {
    /// The checks for `app_id` with keys from `openid_metadata_url` and the SDK's timings:
    /// 5 minutes of skew, a refetch at most once a minute, keys kept a day.
    pub fn new(app_id: &str, openid_metadata_url: Url) -> Self {
        Self {
            app_id: app_id.to_owned(),
            openid_metadata_url,
            issuer: BOT_FRAMEWORK_ISSUER.to_owned(),
            clock_skew: Duration::from_secs(300),
            refresh_interval: Duration::from_secs(60),
            max_key_age: Duration::from_secs(24 * 3600),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a request's token was refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no Authorization header")]
    MissingToken,
    /// A scheme other than `Bearer`, or no token after it.
    #[error("the Authorization scheme is not Bearer")]
    NotBearer,
    /// Not a JWT, or a header without `kid`.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// An algorithm other than RS256/RS384/RS512.
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    /// The `kid` is not in the issuer's key set, even after a refresh.
    #[error("unknown signing key {kid:?}")]
    UnknownKey {
        /// The header's key id (public, not secret).
        kid: String,
    },
    /// The key is not endorsed for the channel.
    #[error("signing key is not endorsed for channel {channel:?}")]
    MissingEndorsement {
        /// The channel that needed the endorsement.
        channel: String,
    },
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `iss` is not the Bot Framework's.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` is not this bot's app id.
    #[error("wrong audience")]
    WrongAudience,
    /// `exp` passed (beyond the skew).
    #[error("token expired")]
    Expired,
    /// `nbf` not reached (beyond the skew).
    #[error("token not valid yet")]
    NotYetValid,
    /// A required claim is missing or has the wrong type.
    #[error("claim {0} missing or malformed")]
    Claim(String),
    /// The `serviceurl` claim differs from the activity's `serviceUrl`.
    #[error("the serviceurl claim does not match the activity's serviceUrl")]
    ServiceUrlMismatch,
    /// The keys could not be fetched and none are cached (HTTP 503).
    #[error("cannot fetch the token signing keys: {0}")]
    KeysUnavailable(String),
}

impl AuthError {
    /// A short stable name for logs and metrics, e.g. `wrong_audience`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::NotBearer => "not_bearer",
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::UnknownKey { .. } => "unknown_key",
            Self::MissingEndorsement { .. } => "missing_endorsement",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Claim(_) => "claim",
            Self::ServiceUrlMismatch => "serviceurl_mismatch",
            Self::KeysUnavailable(_) => "keys_unavailable",
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The key that signed it.
    pub kid: String,
    /// Its `serviceurl` claim (equal to the activity's `serviceUrl`).
    pub service_url: String,
}

struct Key {
    decoding: DecodingKey,
    endorsements: Option<Vec<String>>,
}

#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, Key>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
    /// When a fetch was last tried, successful or not.
    tried_at: Option<Instant>,
}

/// Verifies inbound tokens; share it (it caches the keys). See the module documentation.
pub struct BotAuthenticator {
    config: AuthConfig,
    http: reqwest::Client,
    cache: Mutex<KeyCache>,
}

impl std::fmt::Debug for BotAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotAuthenticator")
            .field("app_id", &self.config.app_id)
            .field("metadata", &self.config.openid_metadata_url.as_str())
            .finish_non_exhaustive()
    }
}

impl BotAuthenticator {
    /// An authenticator; nothing is fetched until the first request.
    ///
    /// # Errors
    /// A message when the HTTP client cannot be built.
    pub fn new(config: AuthConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .user_agent(concat!("session-manager/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            config,
            http,
            cache: Mutex::new(KeyCache::default()),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Verifies the `Authorization` header of a request carrying an activity with
    /// `service_url` and `channel_id` (the activity's own fields; `None` when absent).
    ///
    /// # Errors
    /// [`AuthError`], one variant per failed check.
    pub async fn verify(
        &self,
        authorization: Option<&str>,
        service_url: Option<&str>,
        channel_id: Option<&str>,
    ) -> Result<VerifiedToken, AuthError> {
        let header = authorization.ok_or(AuthError::MissingToken)?.trim();
        let token = match header.split_once(' ') {
            Some(("Bearer", token)) if !token.trim().is_empty() => token.trim(),
            _ => return Err(AuthError::NotBearer),
        };
        let head =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("not a JWT"))?;
        if !matches!(
            head.alg,
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512
        ) {
            return Err(AuthError::Algorithm(format!("{:?}", head.alg)));
        }
        let kid = head
            .kid
            .ok_or(AuthError::Malformed("no kid in the header"))?;
        let mut validation = Validation::new(head.alg);
        validation.leeway = self.config.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.app_id.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);

        let claims = {
            let cache = self.keys_with(&kid).await?;
            let key = cache
                .keys
                .get(&kid)
                .ok_or_else(|| AuthError::UnknownKey { kid: kid.clone() })?;
            endorsed(key.endorsements.as_deref(), channel_id)?;
            jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                    ErrorKind::InvalidAudience => AuthError::WrongAudience,
                    ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
                        AuthError::Claim(c.clone())
                    }
                    ErrorKind::InvalidAlgorithm => AuthError::Algorithm(format!("{:?}", head.alg)),
                    ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
                        AuthError::UnknownKey { kid: kid.clone() }
                    }
                    _ => AuthError::Malformed("undecodable token"),
                })?
                .claims
        };
        let claimed = claims
            .get("serviceurl")
            .and_then(Value::as_str)
            .ok_or(AuthError::ServiceUrlMismatch)?;
        if Some(claimed) != service_url {
            return Err(AuthError::ServiceUrlMismatch);
        }
        Ok(VerifiedToken {
            kid,
            service_url: claimed.to_owned(),
        })
    }

    /// The key cache, refreshed first when it is empty, too old, or lacks `kid` (the last
    /// at most once per refresh interval).
    async fn keys_with(
        &self,
        kid: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, KeyCache>, AuthError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let stale = cache
            .fetched_at
            .is_none_or(|at| now.duration_since(at) >= self.config.max_key_age);
        let unknown = !cache.keys.contains_key(kid);
        let may_retry = cache
            .tried_at
            .is_none_or(|at| now.duration_since(at) >= self.config.refresh_interval);
        if (stale || unknown) && may_retry {
            cache.tried_at = Some(now);
            match self.fetch_keys().await {
                Ok(keys) => {
                    info!(
                        keys = keys.len(),
                        "fetched the Bot Framework token signing keys"
                    );
                    cache.keys = keys;
                    cache.fetched_at = Some(now);
                }
                Err(e) => {
                    warn!(error = %e, "cannot fetch the Bot Framework token signing keys");
                    if cache.keys.is_empty() {
                        return Err(AuthError::KeysUnavailable(e));
                    }
                }
            }
        } else if cache.keys.is_empty() {
            return Err(AuthError::KeysUnavailable(
                "the last attempt failed; retrying shortly".into(),
            ));
        }
        Ok(cache)
    }

    /// Fetches the OpenID metadata, then its JWKS; keeps the RSA keys that parse.
    async fn fetch_keys(&self) -> Result<HashMap<String, Key>, String> {
        let metadata: OpenIdMetadata = self
            .get_json(self.config.openid_metadata_url.as_str())
            .await?;
        let jwks: JwkSet = self.get_json(&metadata.jwks_uri).await?;
        let mut keys = HashMap::new();
        for raw in jwks.keys {
            let Ok(jwk) = serde_json::from_value::<BotFrameworkJwk>(raw) else {
                continue;
            };
            if jwk.kty != "RSA" || jwk.kid.is_empty() {
                continue;
            }
            match DecodingKey::from_rsa_components(&jwk.n, &jwk.e) {
                Ok(decoding) => {
                    keys.insert(
                        jwk.kid,
                        Key {
                            decoding,
                            endorsements: jwk.endorsements,
                        },
                    );
                }
                Err(e) => warn!(kid = %jwk.kid, error = %e, "skipping an unreadable signing key"),
            }
        }
        Ok(keys)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let url = Url::parse(url).map_err(|e| format!("bad URL {url:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("not an http(s) URL: {url}"));
        }
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {}", e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("{url}: {}", e.without_url()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{url}: unexpected answer: {e}"))
    }
}

/// The key must be endorsed for Teams, and for the activity's channel when it names one.
fn endorsed(endorsements: Option<&[String]>, channel_id: Option<&str>) -> Result<(), AuthError> {
    let list = endorsements.unwrap_or_default();
    for needed in std::iter::once(TEAMS_CHANNEL).chain(channel_id.filter(|c| !c.is_empty())) {
        if !list.iter().any(|e| e == needed) {
            return Err(AuthError::MissingEndorsement {
                channel: needed.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endorsements_must_name_teams_and_the_channel() {
        let teams = vec!["msteams".to_owned(), "webchat".to_owned()];
        assert!(endorsed(Some(&teams), Some("msteams")).is_ok());
        assert!(endorsed(Some(&teams), None).is_ok());
        assert_eq!(
            endorsed(Some(&["webchat".to_owned()]), Some("webchat")),
            Err(AuthError::MissingEndorsement {
                channel: "msteams".into()
            })
        );
        assert_eq!(
            endorsed(Some(&teams), Some("slack")),
            Err(AuthError::MissingEndorsement {
                channel: "slack".into()
            })
        );
        assert!(endorsed(None, Some("msteams")).is_err());
    }

    #[tokio::test]
    async fn header_problems_are_typed_before_any_fetch() {
        let auth = BotAuthenticator::new(AuthConfig::new(
            "app",
            Url::parse("http://127.0.0.1:1/openid").expect("url"),
        ))
        .expect("auth");
        let verify = |h: Option<&'static str>| {
            let auth = &auth;
            async move { auth.verify(h, Some("https://s/"), Some("msteams")).await }
        };
        assert_eq!(verify(None).await, Err(AuthError::MissingToken));
        assert_eq!(verify(Some("Basic abc")).await, Err(AuthError::NotBearer));
        assert_eq!(verify(Some("Bearer ")).await, Err(AuthError::NotBearer));
        assert_eq!(
            verify(Some("Bearer not.a.jwt")).await,
            Err(AuthError::Malformed("not a JWT"))
        );
        // {"alg":"HS256","kid":"k"} . {} . sig
        assert_eq!(
            verify(Some("Bearer eyJhbGciOiJIUzI1NiIsImtpZCI6ImsifQ.e30.c2ln")).await,
            Err(AuthError::Algorithm("HS256".into()))
        );
        // {"alg":"RS256"} without kid
        assert_eq!(
            verify(Some("Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln")).await,
            Err(AuthError::Malformed("no kid in the header"))
        );
        // A well-formed header whose keys cannot be fetched.
        assert!(matches!(
            verify(Some("Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.e30.c2ln")).await,
            Err(AuthError::KeysUnavailable(_))
        ));
    }
}
