//! A fake OPNsense API: the firewall alias endpoints, with state in memory.
//!
//! The behaviour follows `opnsense/core` (HEAD `f95e81516e`) as summarised in
//! `/work/shared/reference/wire-formats.md` §2 and re-read from the source:
//!
//! - **Routing** (`Mvc/Router.php`, `Mvc/Dispatcher.php`): `/api/<module>/<controller>/
//!   <action>/<params…>`, empty path elements dropped, each element `ucwords(x, '_')` with
//!   the underscores removed; the action name is case-insensitive (a PHP method), so
//!   `getAliasUUID`, `getaliasuuid` and `get_alias_u_u_i_d` are the same. An unknown
//!   module, controller or action, or a missing required parameter, is HTTP 404
//!   `{"errorMessage":"Endpoint not found"}`, decided *before* authentication. Parameters are
//!   compared as they appear in the raw path (PHP sees `REQUEST_URI` undecoded).
//! - **Auth** (`Base/ApiControllerBase.php` `beforeExecuteRoute`): the `Authorization`
//!   header is split on a space, the second part base64-decoded and split on `:`; a wrong
//!   key or secret is HTTP 401 `{"status":401,"message":"Authentication Failed"}`. Without
//!   any `Authorization` header the UI session path answers HTTP 401 with an empty body.
//!   Every key is allowed every endpoint (no 403).
//! - **Body** (`parseJsonBodyData`): with `Content-Type: application/json` (optionally
//!   `;charset=utf-8`), an empty body is HTTP 400 `{"status":400,"message":"Invalid JSON
//!   syntax"}`, for any method; a JSON object becomes `$_POST`, anything else an empty
//!   `$_POST`. Other content types leave `$_POST` empty (the fake does not parse form
//!   bodies).
//! - **Endpoints** (`Firewall/Api/AliasController.php`, `Base/ApiMutableModelControllerBase.php`):
//!   - `getAliasUUID/{name}` → `{"uuid":"…"}` or `[]`;
//!   - `getItem[/{uuid}]` → `{"alias":{…nodes…}}` with `content` as an option map: the
//!     alias's entries `{"value":e,"selected":1}` (empty content gives the key `""`), then
//!     every alias name not among them `{"selected":0,"value":name}`, and every alias name
//!     gets its `description`. An unknown uuid makes `getBase` return `[]`, to which
//!     `getItemAction` still adds the alias picker, so the answer is
//!     `{"alias":{"content":{…every alias, selected 0…}}}` (the reference's `[]` is only what
//!     `getBase` returns); without a uuid, the defaults of a new alias;
//!   - `setItem/{uuid}` → needs a POST with the key `alias`, else `{"result":"failed"}`;
//!     partial update (only the fields present; `null` skipped; an array or object value is
//!     an exception → HTTP 500 `{"errorMessage":"Unexpected error, check log for details"}`);
//!     an unknown but well-formed (v4, lower-case) uuid creates the alias (upsert), a
//!     malformed one is `{"result":"failed"}`; validation (`name` required, pattern and
//!     unique; `type` in the list; for `host` aliases every `content` entry through
//!     `validateHost`: IP, `ip-ip` range, `!ip`, an alias name or `Util::isDomain`) answers
//!     HTTP 200 `{"result":"failed","validations":{"alias.content":"Entry \"x\" is not a valid
//!     hostname, IP address or range."}}` (a list when one field has several messages) and
//!     saves nothing; else `{"result":"saved"}`. Saving does not touch pf;
//!   - `reconfigure` → a POST applies every enabled alias's saved content ("pf view", see
//!     [`FakeOpnsense::applied_content`]; the real firewall resolves names to addresses) and
//!     answers `{"status":"ok"}`; any other method `{"status":"failed"}`.
//!
//!   Other alias endpoints (`addItem`, `delItem`, `searchItem`, `alias_util/*`, …) are not
//!   implemented and answer 404.
//! - **Encoding** (`Mvc/Response.php`, `www/api.php`): answers are `json_encode` output with
//!   `Content-Type: application/json; charset=UTF-8`, `/` written `\/` and non-ASCII as
//!   `\uXXXX`. Errors from `api.php` (404, 500) use `JSON_UNESCAPED_SLASHES`, are
//!   `htmlspecialchars`-escaped and carry `application/json;charset=utf-8`. The seeded
//!   aliases have descriptions with `/` and `ü`, so clients see both escapes.
//!
//! Two aliases exist at start: [`ALIAS`] (`host`, content [`INITIAL_DOMAIN`]) and
//! [`OTHER_ALIAS`] (`network`); both are already applied.
//!
//! Failure injection ([`FakeOpnsense::fail_next`]) and [`FakeOpnsense::set_down`] stand in
//! for a broken network or firewall. All state sits behind one `std::sync::Mutex` that is
//! never held across an `.await`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The alias the bot manages, created at start.
pub const ALIAS: &str = "llm_approved_domains";
/// A second alias, so `getItem` shows another name with `selected: 0`.
pub const OTHER_ALIAS: &str = "other_alias";
/// The content of [`ALIAS`] at start.
pub const INITIAL_DOMAIN: &str = "api.anthropic.com";
/// Description of [`ALIAS`] (has a `/`, written `\/` on the wire).
pub const ALIAS_DESCRIPTION: &str = "LLM egress allow-list / managed by session-manager";
/// Description of [`OTHER_ALIAS`] (has a `ü`, written `\u00fc` on the wire).
pub const OTHER_DESCRIPTION: &str = "Büro 192.168.1.0/24";

const JSON_TYPE: &str = "application/json; charset=UTF-8";
const ERROR_JSON_TYPE: &str = "application/json;charset=utf-8";
/// How long [`FakeOpnsense::stop`] waits for open requests before aborting them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// `type` options of an alias, in `Alias.xml` order.
const TYPES: &[(&str, &str)] = &[
    ("host", "Host(s)"),
    ("network", "Network(s)"),
    ("port", "Port(s)"),
    ("url", "URL (IPs)"),
    ("urltable", "URL Table (IPs)"),
    ("urljson", "URL Table in JSON format (IPs)"),
    ("geoip", "GeoIP"),
    ("networkgroup", "Network group"),
    ("mac", "MAC address"),
    ("asn", "BGP ASN"),
    ("dynipv6host", "Dynamic IPv6 Host"),
    ("authgroup", "OpenVPN group"),
    ("internal", "Internal (automatic)"),
    ("external", "External (advanced)"),
];

/// What [`FakeOpnsense::fail_next`] makes a request do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answer this status at once, with the body the real stack sends for it: 500 is
    /// `api.php`'s `{"errorMessage":"Unexpected error, check log for details"}`, 400/401/403
    /// the `{"status":…,"message":…}` bodies, 404 `Endpoint not found`, and other 5xx the
    /// web server's HTML error page (`text/html`). Applies to any matching request.
    Status(u16),
    /// Wait this long, then handle the request normally. The work is done even if the client
    /// gave up meanwhile (a slow firewall finishes what it started). Applies to any matching
    /// request.
    Timeout(Duration),
    /// `setItem` (a POST with the `alias` key) answers HTTP 200 `{"result":"failed",
    /// "validations":{"alias.content":"Entry \"x\" is not a valid hostname, IP address or
    /// range."}}` for its first new entry, and saves nothing. Only `setItem` requests
    /// consume it.
    Validation,
    /// A `reconfigure` POST fails like a `filter refresh_aliases` error: HTTP 500
    /// `{"errorMessage":"…","errorTitle":"Alias","errorLevel":"error"}`, nothing applied.
    /// Only `reconfigure` requests consume it.
    ReconfigureFails,
}

#[derive(Clone, Debug)]
struct Alias {
    uuid: String,
    enabled: String,
    name: String,
    kind: String,
    /// Entries joined with `\n`, as `config.xml` stores them.
    content: String,
    description: String,
}

impl Alias {
    fn entries(&self) -> Vec<String> {
        split_content(&self.content)
    }
}

struct Injected {
    path_contains: String,
    remaining: usize,
    failure: Failure,
}

#[derive(Default)]
struct FakeState {
    aliases: Vec<Alias>,
    /// Alias name → entries as of the last successful reconfigure.
    applied: HashMap<String, Vec<String>>,
    reconfigures: usize,
    /// `(alias, entry)` → when a successful reconfigure first applied it.
    first_applied: HashMap<(String, String), std::time::SystemTime>,
    requests: Vec<(String, String, Value)>,
    injected: Vec<Injected>,
    down: bool,
}

impl FakeState {
    /// Takes one injected failure that matches `path` and `accept`.
    fn take_failure(&mut self, path: &str, accept: impl Fn(&Failure) -> bool) -> Option<Failure> {
        let idx = self.injected.iter().position(|i| {
            i.remaining > 0 && path.contains(i.path_contains.as_str()) && accept(&i.failure)
        })?;
        let entry = &mut self.injected[idx];
        entry.remaining -= 1;
        let failure = entry.failure.clone();
        if entry.remaining == 0 {
            self.injected.remove(idx);
        }
        Some(failure)
    }

    fn by_name(&self, name: &str) -> Option<&Alias> {
        self.aliases.iter().find(|a| a.name == name)
    }
}

struct Shared {
    key: String,
    secret: String,
    state: Mutex<FakeState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake firewall. Dropping it stops the server.
pub struct FakeOpnsense {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl FakeOpnsense {
    /// Starts on `127.0.0.1:<free port>`, accepting the API key `key` and secret `secret`,
    /// with [`ALIAS`] and [`OTHER_ALIAS`] configured and applied.
    pub async fn start(key: &str, secret: &str) -> Self {
        let aliases = vec![
            Alias {
                uuid: new_uuid(),
                enabled: "1".into(),
                name: ALIAS.into(),
                kind: "host".into(),
                content: INITIAL_DOMAIN.into(),
                description: ALIAS_DESCRIPTION.into(),
            },
            Alias {
                uuid: new_uuid(),
                enabled: "1".into(),
                name: OTHER_ALIAS.into(),
                kind: "network".into(),
                content: "192.168.1.0/24".into(),
                description: OTHER_DESCRIPTION.into(),
            },
        ];
        let applied = aliases
            .iter()
            .map(|a| (a.name.clone(), a.entries()))
            .collect();
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            secret: secret.to_owned(),
            state: Mutex::new(FakeState {
                aliases,
                applied,
                ..FakeState::default()
            }),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake OPNsense");
        let addr = listener.local_addr().expect("fake OPNsense address");
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let shutdown = CancellationToken::new();
        let listener = DownAwareListener {
            inner: listener,
            shared: Arc::clone(&shared),
        };
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Self {
            addr,
            shared,
            shutdown,
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT` (the base URL, without `/api`).
    /// The bot's settings for this fake (`key`/`secret` as started) and its own callback URL
    /// (`{callback}`, filled in by the test stack).
    pub fn bot_settings(&self, key: &str, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("opnsense-url", self.url()),
            ("opnsense-key", key.into()),
            ("opnsense-secret", secret.into()),
            ("callback-url", "{callback}".into()),
        ]
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The UUID of the alias `name`, if it exists.
    pub fn alias_uuid(&self, name: &str) -> Option<String> {
        self.shared.lock().by_name(name).map(|a| a.uuid.clone())
    }

    /// The saved content of alias `name` (what `setItem` wrote), one entry per element;
    /// empty for an unknown alias.
    pub fn alias_content(&self, name: &str) -> Vec<String> {
        self.shared
            .lock()
            .by_name(name)
            .map(Alias::entries)
            .unwrap_or_default()
    }

    /// What the last successful `reconfigure` applied for alias `name` (the pf table, by
    /// name rather than resolved address); empty for an unknown or disabled alias.
    pub fn applied_content(&self, name: &str) -> Vec<String> {
        self.shared
            .lock()
            .applied
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces the saved content of alias `name` directly (test setup; nothing applied).
    pub fn set_content(&self, name: &str, entries: &[&str]) {
        let mut state = self.shared.lock();
        let alias = state
            .aliases
            .iter_mut()
            .find(|a| a.name == name)
            .expect("set_content: no such alias");
        alias.content = entries.join("\n");
    }

    /// When a successful `reconfigure` first applied `entry` to alias `name` (wall clock, to
    /// compare with timestamps taken in other processes); `None` if it never was.
    pub fn first_applied_at(&self, name: &str, entry: &str) -> Option<std::time::SystemTime> {
        self.shared
            .lock()
            .first_applied
            .get(&(name.to_owned(), entry.to_owned()))
            .copied()
    }

    /// Successful reconfigures so far (POSTs answered `{"status":"ok"}`).
    pub fn reconfigure_count(&self) -> usize {
        self.shared.lock().reconfigures
    }

    /// Every request that reached the HTTP layer, in order: method, path (raw, without the
    /// query) and body (`Null` when empty, the JSON when it parses, else a JSON string).
    pub fn requests(&self) -> Vec<(String, String, Value)> {
        self.shared.lock().requests.clone()
    }

    /// Makes the next `n` requests whose path contains `path_contains` fail as `failure`
    /// (see [`Failure`] for which requests each kind applies to). Injections are consumed in
    /// the order they were made.
    pub fn fail_next(&self, path_contains: &str, n: usize, failure: Failure) {
        if n == 0 {
            return;
        }
        self.shared.lock().injected.push(Injected {
            path_contains: path_contains.to_owned(),
            remaining: n,
            failure,
        });
    }

    /// While down, new connections are closed as soon as they are accepted, and a request on
    /// an already open keep-alive connection gets HTTP 503 (the web server's HTML page) with
    /// `Connection: close`.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    /// Stops the server, giving open requests a moment to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for FakeOpnsense {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Connections
// ------------------------------------------------------------------------------------------

/// A listener that drops new connections while the fake is down.
struct DownAwareListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for DownAwareListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.shared.lock().down {
                        drop(stream);
                        continue;
                    }
                    return (stream, addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

// ------------------------------------------------------------------------------------------
// Request handling
// ------------------------------------------------------------------------------------------

enum Arrival {
    Down,
    Fail(u16),
    Slow(Duration),
    Normal,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let arrival = {
        let mut state = shared.lock();
        state
            .requests
            .push((method.to_string(), path.clone(), recorded_body(&body)));
        if state.down {
            Arrival::Down
        } else {
            match state.take_failure(&path, |f| {
                matches!(f, Failure::Status(_) | Failure::Timeout(_))
            }) {
                Some(Failure::Status(code)) => Arrival::Fail(code),
                Some(Failure::Timeout(delay)) => Arrival::Slow(delay),
                _ => Arrival::Normal,
            }
        }
    };
    match arrival {
        Arrival::Down => {
            let mut response = status_failure(503);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Arrival::Fail(code) => status_failure(code),
        Arrival::Slow(delay) => {
            // Spawned, so the work is done even when the client hangs up first.
            let work = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                process(&shared, &method, &path, &headers, &body)
            });
            work.await.unwrap_or_else(|_| {
                error_output(500, "Unexpected error, check log for details", None)
            })
        }
        Arrival::Normal => process(&shared, &method, &path, &headers, &body),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    GetAliasUuid,
    GetItem,
    SetItem,
    Reconfigure,
}

/// Routing, auth, body parsing and the action; no `.await`, so the lock is never held
/// across one.
fn process(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let Some((action, params)) = route(path) else {
        return error_output(404, "Endpoint not found", None);
    };
    if let Some(refused) = authenticate(shared, headers) {
        return refused;
    }
    let post = match parse_post(headers, body) {
        Ok(post) => post,
        Err(message) => return status_message(400, message),
    };
    let mut state = shared.lock();
    match action {
        Action::GetAliasUuid => {
            let name = params.first().map(String::as_str).unwrap_or_default();
            match state.by_name(name) {
                Some(alias) => ok(&J::obj(vec![("uuid", J::s(&alias.uuid))])),
                None => ok(&J::Arr(Vec::new())),
            }
        }
        Action::GetItem => ok(&get_item(&state, params.first().map(String::as_str))),
        Action::SetItem => {
            let uuid = params.first().map(String::as_str).unwrap_or_default();
            set_item(&mut state, method, path, uuid, &post)
        }
        Action::Reconfigure => {
            if method != Method::POST {
                return ok(&J::obj(vec![("status", J::s("failed"))]));
            }
            if state
                .take_failure(path, |f| *f == Failure::ReconfigureFails)
                .is_some()
            {
                let message = format!(
                    "Unable to refresh alias {ALIAS}: name resolution failed (injected failure)"
                );
                return error_output(500, &message, Some("Alias"));
            }
            let applied: HashMap<String, Vec<String>> = state
                .aliases
                .iter()
                .filter(|a| a.enabled == "1")
                .map(|a| (a.name.clone(), a.entries()))
                .collect();
            let now = std::time::SystemTime::now();
            for (name, entries) in &applied {
                for entry in entries {
                    state
                        .first_applied
                        .entry((name.clone(), entry.clone()))
                        .or_insert(now);
                }
            }
            state.applied = applied;
            state.reconfigures += 1;
            ok(&J::obj(vec![("status", J::s("ok"))]))
        }
    }
}

/// `Router::parsePath` + `Dispatcher::resolve` for the four alias actions.
fn route(path: &str) -> Option<(Action, Vec<String>)> {
    let rest = path.strip_prefix("/api/")?;
    let elements: Vec<&str> = rest.split('/').filter(|e| !e.is_empty()).collect();
    if elements.len() < 3 {
        return None;
    }
    if ucwords_joined(elements[0]) != "Firewall" || ucwords_joined(elements[1]) != "Alias" {
        return None;
    }
    let action = match ucwords_joined(elements[2]).to_ascii_lowercase().as_str() {
        "getaliasuuid" => Action::GetAliasUuid,
        "getitem" => Action::GetItem,
        "setitem" => Action::SetItem,
        "reconfigure" => Action::Reconfigure,
        _ => return None,
    };
    let params: Vec<String> = elements[3..].iter().map(|p| (*p).to_owned()).collect();
    let required = match action {
        Action::GetAliasUuid | Action::SetItem => 1,
        Action::GetItem | Action::Reconfigure => 0,
    };
    if params.len() < required {
        return None;
    }
    Some((action, params))
}

/// `str_replace('_', '', ucwords($x, '_'))`.
fn ucwords_joined(element: &str) -> String {
    let mut out = String::with_capacity(element.len());
    let mut start = true;
    for c in element.chars() {
        if c == '_' {
            start = true;
            continue;
        }
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        start = false;
    }
    out
}

/// `beforeExecuteRoute` for an external client: `None` when the key and secret match.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        // No Authorization header: the session path, which has no session here.
        return Some((StatusCode::UNAUTHORIZED, Bytes::new()).into_response());
    };
    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let parts: Vec<&str> = value.split(' ').collect();
    if parts.len() > 1 {
        let decoded = String::from_utf8_lossy(&base64_decode(parts[1])).into_owned();
        let pair: Vec<&str> = decoded.split(':').collect();
        if pair.len() > 1 && pair[0] == shared.key && pair[1] == shared.secret {
            return None;
        }
    }
    Some(status_message(401, "Authentication Failed"))
}

/// `parseJsonBodyData`: `$_POST` from a JSON body, or the 400 message.
fn parse_post(headers: &HeaderMap, body: &[u8]) -> Result<Map<String, Value>, &'static str> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .replace(' ', "")
                .to_lowercase()
        })
        .unwrap_or_default();
    if content_type != "application/json" && content_type != "application/json;charset=utf-8" {
        return Ok(Map::new());
    }
    if body.is_empty() {
        return Err("Invalid JSON syntax");
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Ok(Map::new()),
    }
}

/// `getItemAction`.
fn get_item(state: &FakeState, uuid: Option<&str>) -> J {
    let mut node: Vec<(String, J)> = match uuid {
        Some(uuid) => match state.aliases.iter().find(|a| a.uuid == uuid) {
            Some(alias) => alias_nodes(alias),
            None => Vec::new(),
        },
        None => alias_nodes(&Alias {
            uuid: String::new(),
            enabled: "1".into(),
            name: String::new(),
            kind: "alert".into(),
            content: String::new(),
            description: String::new(),
        }),
    };
    // The alias picker: every alias name, unselected unless it is an entry, with its
    // description.
    if !state.aliases.is_empty() && !node.iter().any(|(k, _)| k == "content") {
        node.push(("content".into(), J::Obj(Vec::new())));
    }
    if let Some((_, J::Obj(content))) = node.iter_mut().find(|(k, _)| k == "content") {
        for alias in &state.aliases {
            let idx = match content.iter().position(|(k, _)| *k == alias.name) {
                Some(idx) => idx,
                None => {
                    content.push((
                        alias.name.clone(),
                        J::obj(vec![("selected", J::Int(0)), ("value", J::s(&alias.name))]),
                    ));
                    content.len() - 1
                }
            };
            if let J::Obj(option) = &mut content[idx].1 {
                option.retain(|(k, _)| k != "description");
                option.push(("description".into(), J::s(&alias.description)));
            }
        }
    }
    if node.is_empty() {
        J::Arr(Vec::new())
    } else {
        J::Obj(vec![("alias".into(), J::Obj(node))])
    }
}

/// `getNodes()` of one alias, fields in `Alias.xml` order.
fn alias_nodes(alias: &Alias) -> Vec<(String, J)> {
    let option = |value: &str, selected: bool| {
        J::obj(vec![
            ("value", J::s(value)),
            ("selected", J::Int(i64::from(selected))),
        ])
    };
    let types = J::Obj(
        TYPES
            .iter()
            .map(|(key, label)| ((*key).to_owned(), option(label, alias.kind == *key)))
            .collect(),
    );
    let proto = J::Obj(vec![
        ("IPv4".into(), option("IPv4", false)),
        ("IPv6".into(), option("IPv6", false)),
    ]);
    let interface = J::Obj(vec![
        ("".into(), option("None", true)),
        ("lan".into(), option("LAN", false)),
        ("wan".into(), option("WAN", false)),
    ]);
    let authtype = J::Obj(vec![
        ("".into(), option("None", true)),
        ("Basic".into(), option("Basic", false)),
        ("Bearer".into(), option("Bearer", false)),
        ("Header".into(), option("Header", false)),
    ]);
    // AliasContentField::getNodeData: explode("\n", content), every piece selected.
    let mut content: Vec<(String, J)> = Vec::new();
    for entry in alias.content.split('\n') {
        content.retain(|(k, _)| k != entry);
        content.push((entry.to_owned(), option(entry, true)));
    }
    let mut nodes: Vec<(String, J)> = vec![
        ("enabled".into(), J::s(&alias.enabled)),
        ("name".into(), J::s(&alias.name)),
        ("type".into(), types),
        ("path_expression".into(), J::s("")),
        ("proto".into(), proto),
        ("interface".into(), interface),
        ("counters".into(), J::s("")),
        ("updatefreq".into(), J::s("")),
        ("content".into(), J::Obj(content)),
        ("password".into(), J::s("")),
        ("username".into(), J::s("")),
        ("authtype".into(), authtype),
        ("expire".into(), J::s("")),
        // A ModelRelationField without categories: an empty PHP array.
        ("categories".into(), J::Arr(Vec::new())),
    ];
    for volatile in [
        "current_items",
        "last_updated",
        "eval_nomatch",
        "eval_match",
        "in_block_p",
        "in_block_b",
        "in_pass_p",
        "in_pass_b",
        "out_block_p",
        "out_block_b",
        "out_pass_p",
        "out_pass_b",
    ] {
        nodes.push((volatile.into(), J::s("")));
    }
    nodes.push(("description".into(), J::s(&alias.description)));
    nodes
}

/// `setItemAction` / `setBase`.
fn set_item(
    state: &mut FakeState,
    method: &Method,
    path: &str,
    uuid: &str,
    post: &Map<String, Value>,
) -> Response {
    let failed = || J::obj(vec![("result", J::s("failed"))]);
    if *method != Method::POST || !post.contains_key("alias") {
        return ok(&failed());
    }
    let existing = state.aliases.iter().position(|a| a.uuid == uuid);
    let mut candidate = match existing {
        Some(idx) => state.aliases[idx].clone(),
        None if is_uuid_v4(uuid) => Alias {
            uuid: uuid.to_owned(),
            enabled: "1".into(),
            name: String::new(),
            kind: "alert".into(),
            content: String::new(),
            description: String::new(),
        },
        None => return ok(&failed()),
    };
    let before = candidate.entries();
    if let Some(Value::Object(fields)) = post.get("alias") {
        for (key, value) in fields {
            let text = match value {
                Value::Null => continue,
                Value::Array(_) | Value::Object(_) => {
                    return error_output(500, "Unexpected error, check log for details", None)
                }
                Value::String(s) => s.clone(),
                Value::Bool(b) => {
                    if *b {
                        "1".into()
                    } else {
                        String::new()
                    }
                }
                Value::Number(n) => n.to_string(),
            };
            match key.as_str() {
                "enabled" => candidate.enabled = text,
                "name" => candidate.name = text,
                "type" => candidate.kind = text,
                "content" => candidate.content = text,
                "description" => candidate.description = text,
                // Known fields the fake does not keep, and unknown keys: ignored.
                _ => {}
            }
        }
    }
    let mut messages = validate(state, &candidate);
    if state
        .take_failure(path, |f| *f == Failure::Validation)
        .is_some()
    {
        let entries = candidate.entries();
        let bad = entries
            .iter()
            .find(|e| !before.contains(e))
            .or(entries.last())
            .cloned()
            .unwrap_or_default();
        messages.push(("alias.content".into(), invalid_entry(&bad)));
    }
    if messages.is_empty() {
        match existing {
            Some(idx) => state.aliases[idx] = candidate,
            None => state.aliases.push(candidate),
        }
        return ok(&J::obj(vec![("result", J::s("saved"))]));
    }
    // `validate()`: one message per field is a string, several become a list.
    let mut validations: Vec<(String, Vec<String>)> = Vec::new();
    for (field, message) in messages {
        match validations.iter_mut().find(|(f, _)| *f == field) {
            Some((_, list)) => {
                if !list.contains(&message) {
                    list.push(message);
                }
            }
            None => validations.push((field, vec![message])),
        }
    }
    let validations = validations
        .into_iter()
        .map(|(field, list)| {
            let value = if list.len() == 1 {
                J::s(&list[0])
            } else {
                J::Arr(list.iter().map(|m| J::s(m)).collect())
            };
            (field, value)
        })
        .collect();
    ok(&J::Obj(vec![
        ("result".into(), J::s("failed")),
        ("validations".into(), J::Obj(validations)),
    ]))
}

/// The model validation of one alias, as `(field, message)`.
fn validate(state: &FakeState, alias: &Alias) -> Vec<(String, String)> {
    let mut messages = Vec::new();
    if alias.name.is_empty() {
        messages.push(("alias.name".into(), "A value is required.".into()));
    } else {
        if !is_valid_alias_name(&alias.name) {
            messages.push((
                "alias.name".into(),
                "The name must start with a letter or single underscore, be less than 32 \
                 characters and only consist of alphanumeric characters or underscores."
                    .into(),
            ));
        }
        if state
            .aliases
            .iter()
            .any(|a| a.name == alias.name && a.uuid != alias.uuid)
        {
            messages.push((
                "alias.name".into(),
                "An alias with this name already exists.".into(),
            ));
        }
    }
    if !TYPES.iter().any(|(key, _)| *key == alias.kind) {
        messages.push((
            "alias.type".into(),
            format!("Option [{}] not in list.", alias.kind),
        ));
    }
    if alias.kind == "host" && !alias.content.is_empty() {
        for entry in alias.content.split('\n') {
            if !valid_host_entry(state, entry) {
                messages.push(("alias.content".into(), invalid_entry(entry)));
            }
        }
    }
    messages
}

fn invalid_entry(entry: &str) -> String {
    format!("Entry \"{entry}\" is not a valid hostname, IP address or range.")
}

/// `AliasContentField::validateHost` for one entry.
fn valid_host_entry(state: &FakeState, entry: &str) -> bool {
    let range: Vec<&str> = entry.split('-').collect();
    if range.len() == 2 && is_ip(range[0]) {
        return is_ip(range[1]);
    }
    if let Some(rest) = entry.strip_prefix('!') {
        if is_ip(rest) {
            return true;
        }
    }
    state.by_name(entry).is_some() || is_ip(entry) || is_domain(entry)
}

/// `filter_var($x, FILTER_VALIDATE_IP)`.
fn is_ip(text: &str) -> bool {
    text.parse::<Ipv4Addr>().is_ok()
        || text.parse::<Ipv6Addr>().is_ok()
        || text.parse::<IpAddr>().is_ok()
}

/// `Util::isDomain`: not `#…#` (first and last label all digits), and every label a
/// letter/digit run with inner hyphens (`\pL` letters allowed, case-insensitive).
fn is_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if all_digits(labels[0]) && all_digits(labels[labels.len() - 1]) {
        return false;
    }
    let label_char = |c: char| c.is_ascii_alphanumeric() || (!c.is_ascii() && c.is_alphabetic());
    labels.iter().all(|label| {
        let chars: Vec<char> = label.chars().collect();
        match (chars.first(), chars.last()) {
            (Some(first), Some(last)) => {
                label_char(*first)
                    && label_char(*last)
                    && chars.iter().all(|c| label_char(*c) || *c == '-')
            }
            _ => false,
        }
    })
}

/// `AliasNameField`'s pattern
/// `^([a-zA-Z]|(([_a-zA-Z][a-zA-Z0-9]|[a-zA-Z][_a-zA-Z0-9])[_a-zA-Z0-9]{0,29}))$`.
fn is_valid_alias_name(name: &str) -> bool {
    let b = name.as_bytes();
    let word = |c: u8| c == b'_' || c.is_ascii_alphanumeric();
    match b.len() {
        0 => false,
        1 => b[0].is_ascii_alphabetic(),
        2..=31 => {
            let head = ((b[0] == b'_' || b[0].is_ascii_alphabetic())
                && b[1].is_ascii_alphanumeric())
                || (b[0].is_ascii_alphabetic() && word(b[1]));
            head && b[2..].iter().all(|c| word(*c))
        }
        _ => false,
    }
}

/// `Type::isUUID`: a lower-case version-4 UUID.
fn is_uuid_v4(text: &str) -> bool {
    let b = text.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    b.len() == 36
        && [8, 13, 18, 23].iter().all(|i| b[*i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
        && b.iter()
            .enumerate()
            .all(|(i, c)| [8, 13, 18, 23].contains(&i) || hex(c))
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn split_content(content: &str) -> Vec<String> {
    if content.is_empty() {
        Vec::new()
    } else {
        content.split('\n').map(str::to_owned).collect()
    }
}

fn recorded_body(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// PHP's non-strict `base64_decode`: characters outside the alphabet are skipped.
fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bits: u32 = 0;
    let mut count = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        bits = (bits << 6) | u32::from(v);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// PHP-style JSON
// ------------------------------------------------------------------------------------------

/// A JSON value with keys in insertion order (PHP arrays keep order; `serde_json::Map` here
/// does not).
#[derive(Clone, Debug)]
enum J {
    Str(String),
    Int(i64),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn s(text: &str) -> J {
        J::Str(text.to_owned())
    }

    fn obj(fields: Vec<(&str, J)>) -> J {
        J::Obj(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Plain JSON text (serde_json string escaping).
    fn write(&self, out: &mut String) {
        match self {
            J::Str(s) => out.push_str(&serde_json::to_string(s).expect("string")),
            J::Int(n) => {
                let _ = write!(out, "{n}");
            }
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(key).expect("key"));
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }

    fn to_json(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

/// `json_encode` defaults on top of plain JSON: `/` → `\/` (unless `unescaped_slashes`),
/// non-ASCII → `\uXXXX` (UTF-16, lower-case hex). Both only occur inside strings.
fn php_escape(json: &str, unescaped_slashes: bool) -> String {
    let mut out = String::with_capacity(json.len());
    let mut units = [0u16; 2];
    for c in json.chars() {
        if c == '/' && !unescaped_slashes {
            out.push_str("\\/");
        } else if c.is_ascii() {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// `htmlspecialchars($json, ENT_NOQUOTES)`.
fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A controller's array answer to an external client: raw `json_encode`, HTTP 200.
fn ok(value: &J) -> Response {
    with_type(
        StatusCode::OK,
        JSON_TYPE,
        php_escape(&value.to_json(), false),
    )
}

/// `beforeExecuteRoute`'s `{"status":N,"message":…}` (escaped output).
fn status_message(status: u16, message: &str) -> Response {
    let body = J::obj(vec![
        ("status", J::Int(i64::from(status))),
        ("message", J::s(message)),
    ]);
    with_type(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        JSON_TYPE,
        html_escape(&php_escape(&body.to_json(), false)),
    )
}

/// `api.php`'s `error_output`: `errorMessage`, plus `errorTitle` and `errorLevel` for a
/// `UserException`.
fn error_output(status: u16, message: &str, title: Option<&str>) -> Response {
    let mut fields = vec![("errorMessage", J::s(message))];
    if let Some(title) = title {
        fields.push(("errorTitle", J::s(title)));
        fields.push(("errorLevel", J::s("error")));
    }
    with_type(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        ERROR_JSON_TYPE,
        html_escape(&php_escape(&J::obj(fields).to_json(), true)),
    )
}

/// The answer for [`Failure::Status`].
fn status_failure(code: u16) -> Response {
    match code {
        400 => status_message(400, "Invalid JSON syntax"),
        401 => status_message(401, "Authentication Failed"),
        403 => status_message(403, "Forbidden"),
        404 => error_output(404, "Endpoint not found", None),
        500 => error_output(500, "Unexpected error, check log for details", None),
        _ => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let line = format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            );
            let page = format!(
                "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
                 <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n         \
                 \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
                 <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
                 <head>\n  <title>{line}</title>\n </head>\n <body>\n  <h1>{line}</h1>\n \
                 </body>\n</html>\n"
            );
            with_type(status, "text/html", page)
        }
    }
}
