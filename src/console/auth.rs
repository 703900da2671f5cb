//! Who is using the console ([`crate::config::ConsoleAuth`]).
//!
//! - **link**: at start the bot prints a login link with a random token. Opening it once logs
//!   that browser in (the token is then spent) as the person running the bot.
//! - **token**: `SM_CONSOLE_TOKENS` maps tokens to users; `/console/login?token=…` (or the login
//!   form) logs in as that user. Tokens are compared in constant time.
//! - **proxy**: an authenticating reverse proxy (oauth2-proxy, …) puts the user in a header
//!   (`SM_CONSOLE_USER_HEADER`), believed only on connections from `SM_TRUSTED_PROXIES`.
//!
//! A login (link, token) sets a session cookie: random, `HttpOnly`, `SameSite=Strict`. Every
//! state-changing request carries the session's CSRF token in the `X-CSRF-Token` header; the
//! page gets it, other sites cannot read it (and `SameSite=Strict` keeps the cookie off their
//! requests as well). Sessions live in memory: a restart of the bot logs everyone out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use secrecy::ExposeSecret;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{ConsoleAuth, ConsoleToken};

/// The session cookie's name.
pub const COOKIE: &str = "sm_console";

/// The header state-changing requests carry the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How long a login lasts without being used.
const SESSION_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who is looking, and the token their state-changing requests must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Viewer {
    /// The user's name: a chat user id or username (resolved per platform), or the console
    /// name of the person running the bot (link mode).
    pub name: String,
    /// The CSRF token for this login.
    pub csrf: String,
    /// Whether this is the person running the bot (link mode): they see every session.
    pub operator: bool,
}

/// Why a request is not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not logged in (no or an unknown cookie; no trusted proxy header).
    NotLoggedIn,
    /// A state-changing request without the right CSRF token.
    Csrf,
    /// The console is off.
    Off,
}

struct WebSession {
    viewer: Viewer,
    last_used: Instant,
}

/// The console's logins.
pub struct Auth {
    mode: ConsoleAuth,
    tokens: Vec<ConsoleToken>,
    /// Link mode: the one-time login token, until it is used.
    link: Mutex<Option<String>>,
    /// Link mode: who logs in with it.
    operator: String,
    sessions: Mutex<HashMap<String, WebSession>>,
    header: String,
    trusted: Vec<IpNet>,
    /// Proxy mode: the key CSRF tokens are derived from (per user, per process).
    csrf_key: [u8; 32],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A random token: 256 bits from the operating system's generator, hex.
pub fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Auth {
    /// Logins as `mode` says; `operator` is who the link logs in as.
    pub fn new(
        mode: ConsoleAuth,
        tokens: Vec<ConsoleToken>,
        header: &str,
        trusted: Vec<IpNet>,
        operator: String,
    ) -> Self {
        let link = (mode == ConsoleAuth::Link).then(random_token);
        let mut csrf_key = [0u8; 32];
        csrf_key
            .copy_from_slice(&hex::decode(random_token()).unwrap_or_else(|_| vec![0; 32])[..32]);
        Self {
            mode,
            tokens,
            link: Mutex::new(link),
            operator,
            sessions: Mutex::default(),
            header: header.to_ascii_lowercase(),
            trusted,
            csrf_key,
        }
    }

    /// How people log in.
    pub fn mode(&self) -> ConsoleAuth {
        self.mode
    }

    /// Link mode: the one-time login token, until it is used.
    pub fn link_token(&self) -> Option<String> {
        self.link.lock().ok()?.clone()
    }

    /// Logs in with a token (link or token mode): the new session's cookie value and who it
    /// is. `None` for a wrong or spent token.
    pub fn login(&self, token: &str) -> Option<(String, Viewer)> {
        let (name, operator) = match self.mode {
            ConsoleAuth::Link => {
                let mut link = self.link.lock().ok()?;
                let expected = link.as_deref()?;
                if !bool::from(expected.as_bytes().ct_eq(token.as_bytes())) {
                    return None;
                }
                *link = None; // one time only
                (self.operator.clone(), true)
            }
            ConsoleAuth::Token => {
                // Every token is compared, so the time taken does not tell which one matched.
                let mut found = None;
                for t in &self.tokens {
                    if bool::from(t.token.expose_secret().as_bytes().ct_eq(token.as_bytes())) {
                        found = Some(t.user.clone());
                    }
                }
                (found?, false)
            }
            ConsoleAuth::Proxy | ConsoleAuth::Off => return None,
        };
        let viewer = Viewer {
            name,
            csrf: random_token(),
            operator,
        };
        let id = random_token();
        let mut sessions = self.sessions.lock().ok()?;
        let now = Instant::now();
        sessions.retain(|_, s| now.duration_since(s.last_used) < SESSION_IDLE);
        sessions.insert(
            id.clone(),
            WebSession {
                viewer: viewer.clone(),
                last_used: now,
            },
        );
        Some((id, viewer))
    }

    /// Ends the login behind `headers`' cookie.
    pub fn logout(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut sessions)) = (cookie(headers), self.sessions.lock()) {
            sessions.remove(&id);
        }
    }

    /// Who sent a request from `peer` with `headers`.
    ///
    /// # Errors
    /// [`Refusal::NotLoggedIn`]; [`Refusal::Off`].
    pub fn viewer(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Viewer, Refusal> {
        match self.mode {
            ConsoleAuth::Off => Err(Refusal::Off),
            ConsoleAuth::Proxy => {
                if !self.trusted.iter().any(|net| net.contains(&peer)) {
                    return Err(Refusal::NotLoggedIn);
                }
                let name = headers
                    .get(self.header.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|n| super::platform::is_user_name(n))
                    .ok_or(Refusal::NotLoggedIn)?;
                Ok(Viewer {
                    name: name.to_owned(),
                    csrf: self.derived_csrf(name),
                    operator: false,
                })
            }
            ConsoleAuth::Link | ConsoleAuth::Token => {
                let id = cookie(headers).ok_or(Refusal::NotLoggedIn)?;
                let mut sessions = self.sessions.lock().map_err(|_| Refusal::NotLoggedIn)?;
                let session = sessions.get_mut(&id).ok_or(Refusal::NotLoggedIn)?;
                if session.last_used.elapsed() > SESSION_IDLE {
                    sessions.remove(&id);
                    return Err(Refusal::NotLoggedIn);
                }
                session.last_used = Instant::now();
                Ok(session.viewer.clone())
            }
        }
    }

    /// Checks a state-changing request's CSRF token.
    ///
    /// # Errors
    /// [`Refusal::Csrf`].
    pub fn check_csrf(&self, viewer: &Viewer, headers: &HeaderMap) -> Result<(), Refusal> {
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !given.is_empty() && bool::from(given.as_bytes().ct_eq(viewer.csrf.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::Csrf)
        }
    }

    /// Proxy mode: a user's CSRF token, derived so no session needs keeping.
    fn derived_csrf(&self, name: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.csrf_key) else {
            return random_token();
        };
        mac.update(name.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The `Set-Cookie` value of a new login.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_IDLE.as_secs()
    )
}

/// The `Set-Cookie` value that ends a login.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The session cookie of a request.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn the_login_link_works_once() {
        let auth = Auth::new(
            ConsoleAuth::Link,
            vec![],
            "x-forwarded-user",
            vec![],
            "me".into(),
        );
        let token = auth.link_token().expect("a link");
        assert!(auth.login("wrong").is_none());
        let (id, viewer) = auth.login(&token).expect("logged in");
        assert!(viewer.operator);
        assert!(auth.login(&token).is_none(), "spent");
        assert!(auth.link_token().is_none());
        let cookie = format!("other=1; {COOKIE}={id}");
        let h = headers(&[("cookie", &cookie)]);
        assert_eq!(auth.viewer(&h, LOCAL), Ok(viewer.clone()));
        assert_eq!(auth.check_csrf(&viewer, &h), Err(Refusal::Csrf), "no token");
        let with = headers(&[("cookie", &cookie), (CSRF_HEADER, &viewer.csrf)]);
        assert_eq!(auth.check_csrf(&viewer, &with), Ok(()));
        let wrong = headers(&[("cookie", &cookie), (CSRF_HEADER, "nope")]);
        assert_eq!(auth.check_csrf(&viewer, &wrong), Err(Refusal::Csrf));
        auth.logout(&h);
        assert_eq!(auth.viewer(&h, LOCAL), Err(Refusal::NotLoggedIn));
    }

    #[test]
    fn tokens_log_in_as_their_user() {
        let tokens = vec![ConsoleToken {
            token: SecretString::from("0123456789abcdef-alice".to_owned()),
            user: "alice".into(),
        }];
        let auth = Auth::new(
            ConsoleAuth::Token,
            tokens,
            "x-forwarded-user",
            vec![],
            "me".into(),
        );
        assert!(auth.link_token().is_none());
        assert!(auth.login("0123456789abcdef-bob").is_none());
        let (_, viewer) = auth.login("0123456789abcdef-alice").expect("alice");
        assert_eq!(viewer.name, "alice");
        assert!(!viewer.operator);
        assert_eq!(
            auth.viewer(&headers(&[("cookie", "sm_console=forged")]), LOCAL),
            Err(Refusal::NotLoggedIn)
        );
    }

    #[test]
    fn a_proxy_header_counts_only_from_a_trusted_proxy() {
        let trusted = vec!["10.0.0.0/8".parse().expect("net")];
        let auth = Auth::new(
            ConsoleAuth::Proxy,
            vec![],
            "X-Forwarded-User",
            trusted,
            "me".into(),
        );
        let h = headers(&[("x-forwarded-user", "alice")]);
        let proxy: IpAddr = "10.1.2.3".parse().expect("ip");
        let viewer = auth.viewer(&h, proxy).expect("trusted");
        assert_eq!(viewer.name, "alice");
        assert_eq!(
            auth.viewer(&h, LOCAL),
            Err(Refusal::NotLoggedIn),
            "untrusted peer"
        );
        assert_eq!(
            auth.viewer(&HeaderMap::new(), proxy),
            Err(Refusal::NotLoggedIn),
            "no header"
        );
        assert_eq!(auth.viewer(&h, proxy).expect("again").csrf, viewer.csrf);
        assert!(auth.login("anything").is_none());
    }
}
