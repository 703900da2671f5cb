//! The OPNsense API client: keeps the approved domains in one host alias.
//!
//! Approved domains live in a firewall alias of type `host` (by default
//! `llm_approved_domains`). OPNsense resolves the names in a host alias to IP addresses and
//! loads them into the pf table of that name, so a firewall rule that passes traffic to the
//! alias lets the container reach exactly the approved domains.
//!
//! # Wire format
//!
//! Everything here follows `opnsense/core` (`Firewall/Api/AliasController.php`, its base
//! `Base/ApiMutableModelControllerBase.php`, `Base/ApiControllerBase.php`,
//! `Mvc/Response.php`, `www/api.php`), as summarised in `shared/reference/wire-formats.md` §2:
//!
//! | Call | Request | Answer |
//! |---|---|---|
//! | [`OpnsenseClient::alias_uuid`] | `GET /api/firewall/alias/getAliasUUID/{name}` | `{"uuid":"…"}`, or `[]` for an unknown name |
//! | [`OpnsenseClient::alias_entries`] | `GET /api/firewall/alias/getItem/{uuid}` | `{"alias":{…,"content":{"<entry>":{"value":…,"selected":1},…}}}` |
//! | [`OpnsenseClient::ensure_domains`] (save) | `POST /api/firewall/alias/setItem/{uuid}` with `{"alias":{"content":"a\nb"}}` | `{"result":"saved"}`, or HTTP 200 `{"result":"failed","validations":{"alias.content":"…"}}` |
//! | [`OpnsenseClient::reconfigure`] | `POST /api/firewall/alias/reconfigure` with `{}` | `{"status":"ok"}`; a refresh error is HTTP 500 `{"errorMessage":"…","errorTitle":"Alias",…}` |
//!
//! - **Auth:** HTTP Basic, user = API key, password = API secret. Bad credentials are HTTP 401
//!   `{"status":401,"message":"Authentication Failed"}`, a missing ACL privilege HTTP 403
//!   `{"status":403,"message":"Forbidden"}`.
//! - **Bodies:** every POST carries `Content-Type: application/json` and a JSON object;
//!   OPNsense answers HTTP 400 `{"status":400,"message":"Invalid JSON syntax"}` to a JSON POST
//!   with an empty body, so body-less calls send `{}`.
//! - **Answers** are PHP `json_encode` output (`\/`, `\uXXXX`); an empty PHP array is `[]`,
//!   never `{}`. Errors raised inside OPNsense are HTTP 500
//!   `{"errorMessage":"…","errorTitle":"…","errorLevel":"error"}`; an unknown endpoint is
//!   HTTP 404 `{"errorMessage":"Endpoint not found"}`.
//! - **Reading `content`:** `getItem` returns the alias content as a map of option entries:
//!   each current entry has `selected: 1`; `getItemAction` adds every *other* alias name with
//!   `selected: 0` (and a `description`) for the UI picker, and empty content shows up as the
//!   key `""`. Only selected, non-empty keys are entries.
//! - **Writing `content`:** `setItem` is a partial update, so `{"alias":{"content":…}}` touches
//!   nothing else; entries are joined with `\n`. Saving only writes `config.xml`: nothing
//!   reaches pf until `reconfigure`.
//!
//! # Retries
//!
//! The client never retries. The caller retries with backoff and keeps its own state, using
//! [`FirewallError::is_permanent`] to stop early. [`OpnsenseClient::ensure_domains`] is
//! idempotent and always ends with a `reconfigure`, so calling it again after any failure
//! (even one after the save) converges.
//!
//! # Secrets
//!
//! The key and secret stay in [`SecretString`]s; they only leave them to build the
//! `Authorization` header, which reqwest marks sensitive. Neither [`FirewallSettings`] nor
//! [`OpnsenseClient`] shows them in `Debug`, and no error or log line contains them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use url::Url;

use crate::config::FirewallSettings;

/// Longest piece of a server's answer quoted in an error message.
const MAX_QUOTED: usize = 300;

/// Why an OPNsense call failed.
///
/// Messages quote what the server said (at most a few hundred characters), never the
/// credentials.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// No answer: the connection failed, was closed, or the call timed out (a call that timed
    /// out may still have taken effect on the firewall).
    #[error("OPNsense is unreachable: {0}")]
    Unreachable(String),
    /// HTTP 401 (bad key or secret) or 403 (the key's user lacks the ACL privilege, e.g.
    /// `page-firewall-alias-edit` for `api/firewall/alias/*`).
    #[error("OPNsense refused the credentials (HTTP {status}): {message}")]
    Auth {
        /// 401 or 403.
        status: u16,
        /// The server's `message`.
        message: String,
    },
    /// The alias does not exist (`getAliasUUID` answered `[]`, or `getItem` found no such
    /// item).
    #[error("the OPNsense alias {alias:?} does not exist")]
    AliasNotFound {
        /// The configured alias name.
        alias: String,
    },
    /// OPNsense rejected the content (`setItem` answered `{"result":"failed"}`): the
    /// `validations` messages, e.g. `Entry "x" is not a valid hostname, IP address or range.`
    #[error("OPNsense rejected the alias content: {}", messages.join("; "))]
    Validation {
        /// One message per problem (never empty).
        messages: Vec<String>,
    },
    /// Applying the aliases failed: `reconfigure` answered HTTP 500 (the `errorMessage` of
    /// the `filter refresh_aliases` failure) or a `status` other than `ok`.
    #[error("OPNsense could not apply the aliases: {0}")]
    Reconfigure(String),
    /// Any other unexpected HTTP status (5xx, 404 for a wrong base URL, 3xx: redirects are
    /// not followed).
    #[error("OPNsense answered HTTP {status}: {message}")]
    Server {
        /// The HTTP status.
        status: u16,
        /// `errorMessage`/`message` from the body, or the start of the body.
        message: String,
    },
    /// A successful status with a body of the wrong shape.
    #[error("unexpected answer from OPNsense: {0}")]
    Decode(String),
}

impl FirewallError {
    /// Whether retrying the same call cannot help without someone changing the firewall or
    /// the configuration: [`Validation`](Self::Validation),
    /// [`AliasNotFound`](Self::AliasNotFound) and [`Auth`](Self::Auth). Every other error may
    /// go away on its own (network, overload, a transient `reconfigure` failure).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Validation { .. } | Self::AliasNotFound { .. } | Self::Auth { .. }
        )
    }
}

/// A client for one OPNsense firewall and one alias. Cheap to clone (the connection pool and
/// configuration are shared).
#[derive(Clone)]
pub struct OpnsenseClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `<base>/api/firewall/alias/`.
    api: Url,
    key: SecretString,
    secret: SecretString,
    alias: String,
    timeout: Duration,
}

impl fmt::Debug for OpnsenseClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpnsenseClient")
            .field("api", &self.inner.api.as_str())
            .field("alias", &self.inner.alias)
            .finish_non_exhaustive()
    }
}

impl OpnsenseClient {
    /// A client for the firewall at `cfg.url` (a base URL without `/api`, possibly with a
    /// path prefix when OPNsense sits behind a proxy), managing the alias `cfg.alias`, with
    /// `cfg.timeout` as the bound on each API call, connecting included.
    ///
    /// TLS uses rustls with the platform's trust store; with `verify_tls = false` any
    /// certificate is accepted (`danger_accept_invalid_certs`), which gives up protection
    /// against an attacker between the bot and the firewall. Redirects are not followed (a
    /// redirected POST would turn into a GET and silently do nothing).
    ///
    /// # Errors
    /// [`FirewallError::Unreachable`] when the URL is not an `http(s)` base URL or the HTTP
    /// client cannot be built.
    pub fn new(cfg: &FirewallSettings) -> Result<Self, FirewallError> {
        let (Some(url), Some(key), Some(secret)) = (&cfg.url, &cfg.key, &cfg.secret) else {
            return Err(FirewallError::Unreachable(
                "SM_OPNSENSE_URL, SM_OPNSENSE_KEY and SM_OPNSENSE_SECRET are not all set".into(),
            ));
        };
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(FirewallError::Unreachable(format!(
                "the OPNsense URL must be an http(s) base URL, not {:?}",
                url.scheme()
            )));
        }
        let mut api = url.clone();
        api.set_query(None);
        api.set_fragment(None);
        let path = format!("{}/api/firewall/alias/", api.path().trim_end_matches('/'));
        api.set_path(&path);
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .tls_danger_accept_invalid_certs(!cfg.verify_tls)
            .user_agent(concat!("session-manager/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                FirewallError::Unreachable(format!(
                    "cannot build the HTTP client: {}",
                    error_chain(&e)
                ))
            })?;
        if !cfg.verify_tls {
            tracing::warn!(url = %api, "OPNsense TLS certificate verification is disabled");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                api,
                key: key.clone(),
                secret: secret.clone(),
                alias: cfg.alias.clone(),
                timeout: cfg.timeout,
            }),
        })
    }

    /// The alias this client manages.
    pub fn alias(&self) -> &str {
        &self.inner.alias
    }

    /// The UUID of the alias: `GET /api/firewall/alias/getAliasUUID/{name}`, answered
    /// `{"uuid":"…"}`, or `[]` when no alias has that name.
    ///
    /// # Errors
    /// [`FirewallError::AliasNotFound`] for `[]`; otherwise [`FirewallError`] as for any call.
    pub async fn alias_uuid(&self) -> Result<String, FirewallError> {
        let alias = &self.inner.alias;
        let body = self
            .call(Method::GET, "getAliasUUID", Some(alias), None)
            .await?;
        parse_alias_uuid(&body, alias)
    }

    /// The entries of the alias with this UUID: `GET /api/firewall/alias/getItem/{uuid}`,
    /// keeping the keys of `alias.content` whose `selected` is `1` (or `"1"`, or `true`), in
    /// the order the server sent them, without the `""` key of empty content. A plain string
    /// `content` (not an option map) is split on `\n`.
    ///
    /// # Errors
    /// [`FirewallError::AliasNotFound`] when there is no such item: the answer is `[]`, or
    /// (opnsense/core since `getItemAction` adds the alias picker to any answer) an `alias`
    /// object without a `name`. [`FirewallError::Decode`] for any other shape.
    pub async fn alias_entries(&self, uuid: &str) -> Result<Vec<String>, FirewallError> {
        let body = self
            .call_raw(Method::GET, "getItem", Some(uuid), None)
            .await?;
        parse_alias_entries(&body, &self.inner.alias)
    }

    /// Adds the domains not yet in the alias (idempotent), saves with `setItem` (content
    /// newline-joined, partial update `{"alias":{"content":…}}`), then ALWAYS reconfigures (a
    /// retry after a failed reconfigure must reconfigure again). Returns which domains were
    /// newly added.
    ///
    /// Domains are compared with the existing entries ignoring ASCII case; duplicates in
    /// `domains` count once. Existing entries are kept as they are, in their order, and the
    /// new ones are appended. When nothing is missing, nothing is saved, but `reconfigure`
    /// still runs. Callers pass names already checked by [`crate::firewall::domain`];
    /// OPNsense validates them again (`validateHost`).
    ///
    /// # Errors
    /// [`FirewallError::Validation`] when a domain is empty or contains whitespace or a control
    /// character (it would split into several entries; nothing is sent), or when OPNsense
    /// rejects the content; [`FirewallError::Reconfigure`] when saving worked but applying did
    /// not; otherwise [`FirewallError`] from the lookup, read or save.
    pub async fn ensure_domains(&self, domains: &[String]) -> Result<Vec<String>, FirewallError> {
        let bad: Vec<String> = domains
            .iter()
            .filter(|d| d.is_empty() || d.chars().any(|c| c.is_whitespace() || c.is_control()))
            .map(|d| format!("{d:?} is not a single alias entry"))
            .collect();
        if !bad.is_empty() {
            return Err(FirewallError::Validation { messages: bad });
        }
        let uuid = self.alias_uuid().await?;
        let mut entries = self.alias_entries(&uuid).await?;
        let mut added: Vec<String> = Vec::new();
        for domain in domains {
            let present = entries
                .iter()
                .chain(added.iter())
                .any(|e| e.eq_ignore_ascii_case(domain));
            if !present {
                added.push(domain.clone());
            }
        }
        if !added.is_empty() {
            entries.extend(added.iter().cloned());
            self.save_content(&uuid, &entries.join("\n")).await?;
            tracing::info!(alias = %self.inner.alias, added = ?added, "saved domains in the OPNsense alias");
        }
        self.reconfigure().await?;
        Ok(added)
    }

    /// Removes `domains` from the alias where present (compared ignoring ASCII case), saves
    /// with `setItem` (the remaining entries in their order, newline-joined), then ALWAYS
    /// reconfigures, as [`ensure_domains`](Self::ensure_domains) does. Returns which domains
    /// were in the alias and are now removed; removing an absent domain changes nothing.
    ///
    /// # Errors
    /// As [`ensure_domains`](Self::ensure_domains).
    pub async fn remove_domains(&self, domains: &[String]) -> Result<Vec<String>, FirewallError> {
        let uuid = self.alias_uuid().await?;
        let entries = self.alias_entries(&uuid).await?;
        let (removed, kept): (Vec<String>, Vec<String>) = entries
            .into_iter()
            .partition(|e| domains.iter().any(|d| d.eq_ignore_ascii_case(e)));
        if !removed.is_empty() {
            self.save_content(&uuid, &kept.join("\n")).await?;
            tracing::info!(alias = %self.inner.alias, removed = ?removed, "removed domains from the OPNsense alias");
        }
        self.reconfigure().await?;
        Ok(removed)
    }

    /// Whether `domain` is in the alias now (`getAliasUUID`, then `getItem`), compared ignoring
    /// ASCII case: what the firewall enforces, not what the bot last wrote.
    ///
    /// # Errors
    /// As [`alias_entries`](Self::alias_entries).
    pub async fn contains(&self, domain: &str) -> Result<bool, FirewallError> {
        let uuid = self.alias_uuid().await?;
        let entries = self.alias_entries(&uuid).await?;
        Ok(entries.iter().any(|e| e.eq_ignore_ascii_case(domain)))
    }

    /// Applies the saved aliases to pf: `POST /api/firewall/alias/reconfigure` with body `{}`,
    /// expecting `{"status":"ok"}`.
    ///
    /// # Errors
    /// [`FirewallError::Reconfigure`] for HTTP 500 (OPNsense's `errorMessage`, e.g. an alias
    /// refresh failure) or any `status` other than `ok` (a non-POST gets `"failed"`);
    /// otherwise [`FirewallError`] as for any call.
    pub async fn reconfigure(&self) -> Result<(), FirewallError> {
        let body = match self
            .call(Method::POST, "reconfigure", None, Some(&json!({})))
            .await
        {
            Ok(body) => body,
            Err(FirewallError::Server {
                status: 500,
                message,
            }) => return Err(FirewallError::Reconfigure(message)),
            Err(e) => return Err(e),
        };
        match body.get("status").and_then(Value::as_str) {
            Some("ok") => {
                tracing::debug!(alias = %self.inner.alias, "OPNsense aliases reconfigured");
                Ok(())
            }
            Some(other) => Err(FirewallError::Reconfigure(format!(
                "reconfigure answered status {other:?}"
            ))),
            None => Err(FirewallError::Decode(format!(
                "reconfigure answered without a status: {}",
                quote(&body.to_string())
            ))),
        }
    }

    /// Cheap health check: [`alias_uuid`](Self::alias_uuid). `Ok` when the API answers, the
    /// credentials work and the alias exists.
    ///
    /// # Errors
    /// As [`alias_uuid`](Self::alias_uuid).
    pub async fn check(&self) -> Result<(), FirewallError> {
        self.alias_uuid().await.map(|_| ())
    }

    /// `POST setItem/{uuid}` with `{"alias":{"content":…}}`.
    async fn save_content(&self, uuid: &str, content: &str) -> Result<(), FirewallError> {
        let body = json!({ "alias": { "content": content } });
        let answer = self
            .call(Method::POST, "setItem", Some(uuid), Some(&body))
            .await?;
        parse_set_result(&answer)
    }

    /// One call whose successful answer is decoded as JSON.
    async fn call(
        &self,
        method: Method,
        action: &str,
        param: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, FirewallError> {
        let bytes = self.call_raw(method, action, param, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            FirewallError::Decode(format!(
                "{action} answered with invalid JSON ({e}): {}",
                quote(&String::from_utf8_lossy(&bytes))
            ))
        })
    }

    /// One call; the body of a 2xx answer, or the error for any other.
    async fn call_raw(
        &self,
        method: Method,
        action: &str,
        param: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, FirewallError> {
        let url = self.url_for(action, param)?;
        let inner = &self.inner;
        tracing::debug!(%method, path = url.path(), "OPNsense request");
        let mut request = inner.http.request(method, url).basic_auth(
            inner.key.expose_secret(),
            Some(inner.secret.expose_secret()),
        );
        if let Some(body) = body {
            // `json` sets `Content-Type: application/json`.
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let html = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("html"));
        let bytes = response.bytes().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let mut message = error_message(&bytes, html);
        if let Some(location) = location.filter(|_| status.is_redirection()) {
            message = format!("redirected to {}", quote(&location));
        }
        let code = status.as_u16();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FirewallError::Auth {
                status: code,
                message,
            },
            _ => FirewallError::Server {
                status: code,
                message,
            },
        })
    }

    /// `<api>/<action>[/<param>]`, the parameter percent-encoded as one path segment.
    fn url_for(&self, action: &str, param: Option<&str>) -> Result<Url, FirewallError> {
        let mut url = self.inner.api.clone();
        let mut path = format!("{}{action}", url.path());
        if let Some(param) = param {
            // "", "." and ".." would change which endpoint is called.
            if matches!(param, "" | "." | "..") {
                return Err(FirewallError::AliasNotFound {
                    alias: self.inner.alias.clone(),
                });
            }
            path.push('/');
            path.push_str(&encode_segment(param));
        }
        url.set_path(&path);
        Ok(url)
    }

    fn transport(&self, e: &reqwest::Error) -> FirewallError {
        if e.is_timeout() {
            FirewallError::Unreachable(format!(
                "no answer within {:?}: {}",
                self.inner.timeout,
                error_chain(e)
            ))
        } else {
            FirewallError::Unreachable(error_chain(e))
        }
    }
}

/// Percent-encodes every byte except the URL-unreserved ones (`A-Z a-z 0-9 - . _ ~`).
fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The error and its sources, without the URL.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    // reqwest puts the URL in its message as " for url (…)"; it holds no secret (credentials
    // travel in a header), but keep messages short.
    match text.find(" for url (") {
        Some(start) => match text[start..].find(')') {
            Some(end) => {
                let mut short = text[..start].to_owned();
                short.push_str(&text[start + end + 1..]);
                short
            }
            None => text,
        },
        None => text,
    }
}

/// Shortens and flattens server text for an error message.
fn quote(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > MAX_QUOTED {
        let mut cut: String = flat.chars().take(MAX_QUOTED).collect();
        cut.push('…');
        cut
    } else {
        flat
    }
}

/// The message of an error answer: `message` (auth and body errors), `errorMessage` (with
/// `errorTitle`) from `api.php`, an HTML page's `<title>`, or the start of the body.
fn error_message(body: &[u8], html: bool) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(unescape_html);
        if let Some(message) = text("errorMessage") {
            return match text("errorTitle").filter(|t| !t.is_empty()) {
                Some(title) => quote(&format!("{title}: {message}")),
                None => quote(&message),
            };
        }
        if let Some(message) = text("message") {
            return quote(&message);
        }
    }
    let text = String::from_utf8_lossy(body);
    if html {
        let lower = text.to_ascii_lowercase();
        if let (Some(start), Some(end)) = (lower.find("<title>"), lower.find("</title>")) {
            if start + 7 <= end {
                return quote(&text[start + 7..end]);
            }
        }
    }
    if text.trim().is_empty() {
        "(empty body)".to_owned()
    } else {
        quote(&text)
    }
}

/// Undoes `htmlspecialchars(…, ENT_NOQUOTES)`, which OPNsense applies to error output.
fn unescape_html(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// `{"uuid":"…"}` → the UUID; `[]` (or `{}`) → not found.
fn parse_alias_uuid(body: &Value, alias: &str) -> Result<String, FirewallError> {
    match body {
        Value::Object(map) => match map.get("uuid") {
            Some(Value::String(uuid)) if !uuid.is_empty() => Ok(uuid.clone()),
            None if map.is_empty() => Err(FirewallError::AliasNotFound {
                alias: alias.to_owned(),
            }),
            _ => Err(FirewallError::Decode(format!(
                "getAliasUUID answered {}",
                quote(&body.to_string())
            ))),
        },
        Value::Array(items) if items.is_empty() => Err(FirewallError::AliasNotFound {
            alias: alias.to_owned(),
        }),
        _ => Err(FirewallError::Decode(format!(
            "getAliasUUID answered {}",
            quote(&body.to_string())
        ))),
    }
}

/// The body of `getItem`, only as far as it is read.
#[derive(Deserialize)]
struct GetItem {
    alias: AliasNode,
}

#[derive(Deserialize)]
struct AliasNode {
    #[serde(default)]
    name: Option<Value>,
    #[serde(default)]
    content: Option<Content>,
}

/// `alias.content` with the selected keys in the order they came.
struct Content(Vec<String>);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of alias entries, a newline-separated string or []")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Content, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, option)) = map.next_entry::<String, Value>()? {
                    if !key.is_empty() && is_selected(&option) {
                        entries.push(key);
                    }
                }
                Ok(Content(entries))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                // PHP's empty array; anything inside is not a known shape.
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("content is a non-empty list"));
                }
                Ok(Content(Vec::new()))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content(
                    v.split('\n')
                        .filter(|e| !e.is_empty())
                        .map(str::to_owned)
                        .collect(),
                ))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
                Ok(Content(Vec::new()))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

/// `selected` is `1` for entries of the alias (PHP may also give `"1"` or `true`).
fn is_selected(option: &Value) -> bool {
    match option.get("selected") {
        Some(Value::Number(n)) => n.as_u64() == Some(1) || n.as_f64() == Some(1.0),
        Some(Value::String(s)) => s == "1",
        Some(Value::Bool(b)) => *b,
        _ => false,
    }
}

/// The selected entries of a `getItem` answer.
fn parse_alias_entries(body: &[u8], alias: &str) -> Result<Vec<String>, FirewallError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        FirewallError::Decode(format!(
            "getItem answered with invalid JSON ({e}): {}",
            quote(&String::from_utf8_lossy(body))
        ))
    })?;
    let not_found = || FirewallError::AliasNotFound {
        alias: alias.to_owned(),
    };
    match &value {
        Value::Array(items) if items.is_empty() => return Err(not_found()),
        Value::Object(map) if map.is_empty() => return Err(not_found()),
        Value::Object(_) => {}
        _ => {
            return Err(FirewallError::Decode(format!(
                "getItem answered {}",
                quote(&value.to_string())
            )))
        }
    }
    // Parsed again from the bytes: `Value` maps are sorted, this keeps the server's order.
    let item: GetItem = serde_json::from_slice(body).map_err(|e| {
        FirewallError::Decode(format!(
            "getItem answered an unexpected shape ({e}): {}",
            quote(&value.to_string())
        ))
    })?;
    // An unknown uuid: `getBase` gives `[]`, to which `getItemAction` then adds the alias
    // picker, leaving `{"alias":{"content":{…}}}` without any field of a real item.
    let named = item
        .alias
        .name
        .as_ref()
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !named {
        return Err(not_found());
    }
    match item.alias.content {
        Some(Content(entries)) => Ok(entries),
        None => Err(FirewallError::Decode(
            "getItem answered an alias without content".to_owned(),
        )),
    }
}

/// `setItem`'s answer: `{"result":"saved"}`, or `{"result":"failed","validations":{…}}`
/// where each value is a message or a list of messages.
fn parse_set_result(body: &Value) -> Result<(), FirewallError> {
    match body.get("result").and_then(Value::as_str) {
        Some("saved") => Ok(()),
        Some("failed") => {
            let mut messages = Vec::new();
            if let Some(Value::Object(validations)) = body.get("validations") {
                for value in validations.values() {
                    match value {
                        Value::String(m) => messages.push(m.clone()),
                        Value::Array(items) => messages
                            .extend(items.iter().filter_map(Value::as_str).map(str::to_owned)),
                        other => messages.push(other.to_string()),
                    }
                }
            }
            if messages.is_empty() {
                messages.push(
                    "setItem answered result \"failed\" without validations (not a POST, no \
                     alias key or a malformed uuid)"
                        .to_owned(),
                );
            }
            Err(FirewallError::Validation { messages })
        }
        _ => Err(FirewallError::Decode(format!(
            "setItem answered {}",
            quote(&body.to_string())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(body: &str) -> Result<Vec<String>, FirewallError> {
        parse_alias_entries(body.as_bytes(), "a")
    }

    #[test]
    fn uuid_shapes() {
        assert_eq!(
            parse_alias_uuid(&json!({"uuid": "u-1"}), "a").unwrap(),
            "u-1"
        );
        assert!(matches!(
            parse_alias_uuid(&json!([]), "a"),
            Err(FirewallError::AliasNotFound { .. })
        ));
        assert!(matches!(
            parse_alias_uuid(&json!({"uuid": 5}), "a"),
            Err(FirewallError::Decode(_))
        ));
        assert!(matches!(
            parse_alias_uuid(&json!("x"), "a"),
            Err(FirewallError::Decode(_))
        ));
    }

    #[test]
    fn entries_keep_order_and_skip_unselected_and_empty() {
        let body = r#"{"alias":{"name":"a","content":{
            "z.example":{"value":"z.example","selected":1},
            "a.example":{"value":"a.example","selected":"1"},
            "":{"value":"","selected":1},
            "other":{"selected":0,"value":"other","description":"x"},
            "b.example":{"value":"b.example","selected":true}}}}"#;
        assert_eq!(
            entries(body).unwrap(),
            vec!["z.example", "a.example", "b.example"]
        );
    }

    #[test]
    fn entries_not_found_shapes() {
        for body in [
            "[]",
            "{}",
            r#"{"alias":[]}"#,
            r#"{"alias":{"content":{"a":{"selected":0,"value":"a","description":""}}}}"#,
        ] {
            assert!(
                matches!(entries(body), Err(FirewallError::AliasNotFound { .. })),
                "{body}"
            );
        }
        for body in [
            "[1]",
            "\"x\"",
            "<html>",
            r#"{"alias":"x"}"#,
            r#"{"alias":{"name":"a"}}"#,
        ] {
            assert!(
                matches!(entries(body), Err(FirewallError::Decode(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn entries_other_content_shapes() {
        assert!(entries(r#"{"alias":{"name":"a","content":[]}}"#)
            .unwrap()
            .is_empty());
        assert_eq!(
            entries(r#"{"alias":{"name":"a","content":"x.example\ny.example"}}"#).unwrap(),
            vec!["x.example", "y.example"]
        );
    }

    #[test]
    fn set_results() {
        assert!(parse_set_result(&json!({"result": "saved"})).is_ok());
        let err = parse_set_result(&json!({"result": "failed", "validations": {
            "alias.content": ["one", "two"], "alias.name": "three"}}))
        .unwrap_err();
        match err {
            FirewallError::Validation { messages } => {
                assert_eq!(messages, vec!["one", "two", "three"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_set_result(&json!({"result": "failed"})),
            Err(FirewallError::Validation { .. })
        ));
        assert!(matches!(
            parse_set_result(&json!([])),
            Err(FirewallError::Decode(_))
        ));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(
                br#"{"status":401,"message":"Authentication Failed"}"#,
                false
            ),
            "Authentication Failed"
        );
        assert_eq!(
            error_message(
                br#"{"errorMessage":"a &amp; b","errorTitle":"Alias","errorLevel":"error"}"#,
                false
            ),
            "Alias: a & b"
        );
        assert_eq!(
            error_message(b"<html><title>503 Service Unavailable</title></html>", true),
            "503 Service Unavailable"
        );
        assert_eq!(error_message(b"", false), "(empty body)");
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(
            encode_segment("llm_approved_domains"),
            "llm_approved_domains"
        );
        assert_eq!(encode_segment("a/b?c#d e%"), "a%2Fb%3Fc%23d%20e%25");
    }

    #[test]
    fn debug_hides_secrets() {
        let cfg = FirewallSettings {
            lease: std::time::Duration::from_secs(300),
            url: Some(Url::parse("https://fw.example").unwrap()),
            key: Some(SecretString::from("the-key".to_owned())),
            secret: Some(SecretString::from("the-secret".to_owned())),
            alias: "a".into(),
            verify_tls: true,
            timeout: Duration::from_secs(5),
        };
        let text = format!("{cfg:?}");
        assert!(
            !text.contains("the-key") && !text.contains("the-secret"),
            "{text}"
        );
        let client = OpnsenseClient::new(&cfg).unwrap();
        let text = format!("{client:?}");
        assert!(
            !text.contains("the-key") && !text.contains("the-secret"),
            "{text}"
        );
        assert!(text.contains("/api/firewall/alias/"), "{text}");
    }
}
