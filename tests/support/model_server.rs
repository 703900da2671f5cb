//! A scripted fake of the Anthropic Messages API, for driving the real Claude Code CLI
//! deterministically (`ANTHROPIC_BASE_URL=<ModelServer::url()>`).
//!
//! The wire format follows `/work/shared/reference/claude-code.md` ("The scripted model
//! server") and what CLI 2.1.328 was seen to send and accept:
//!
//! - `POST /v1/messages[?beta=true]` with `"stream": true` is a *script request*: it is
//!   recorded as a [`ModelRequest`], matched against the [`Script`] (rules in order, first
//!   fit wins, exhausted rules skipped, else the fallback) and answered with Server-Sent
//!   Events: `message_start`, per content block `content_block_start` /
//!   `content_block_delta`… / `content_block_stop`, then `message_delta` and `message_stop`.
//! - Everything else (non-streaming `/v1/messages` side calls, `/v1/messages/count_tokens`,
//!   `GET`/`HEAD` probes such as `HEAD /api/hello`, unknown paths) is a *side request*: it is
//!   recorded as a [`SideRequest`], never matched against the script, and gets a small valid
//!   answer.
//!
//! Usage numbers are deterministic: `input_tokens` is [`input_tokens_for`] the raw request
//! body length, `output_tokens` is computed from the reply ([`Reply::output_tokens`]), and the
//! cache counters are always 0. Each recorded [`ModelRequest`] carries the [`Usage`] it was
//! answered with, so tests can compare a consumer's token counters with the fake's.
//!
//! ```ignore
//! let server = ModelServer::start(
//!     Script::new()
//!         .on_last_user("hello", Reply::text("hi there"))
//!         .on_last_user("make a file", Reply::bash("echo x > f.txt && cat f.txt"))
//!         .on_tool_result("x", Reply::text("done"))
//!         .fallback(Reply::text("ok")),
//! )
//! .await;
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Text blocks the CLI injects into user messages start with this; they are not user input.
const SYSTEM_REMINDER: &str = "<system-reminder>";
/// Largest request body accepted (the CLI's first request is about 50 KB; long
/// conversations grow).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// How long [`ModelServer::stop`] lets in-flight answers finish before aborting them.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Text of the answer to non-streaming `/v1/messages` side calls.
pub const SIDE_REPLY_TEXT: &str = "ok";

// ------------------------------------------------------------------------------------------
// Public types: requests as recorded
// ------------------------------------------------------------------------------------------

/// Token usage the fake reported for one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `message_start.message.usage.input_tokens`.
    pub input_tokens: u64,
    /// `message_delta.usage.output_tokens` (the final count; `message_start` says 1).
    pub output_tokens: u64,
    /// Always 0.
    pub cache_creation_input_tokens: u64,
    /// Always 0.
    pub cache_read_input_tokens: u64,
}

/// One streamed `POST /v1/messages` request, as the fake saw it.
#[derive(Clone, Debug)]
pub struct ModelRequest {
    /// The whole JSON body.
    pub body: Value,
    /// The newest user input: the last `role: "user"` message's text (a string content, or
    /// its `text` blocks joined with `\n`, leaving out the CLI's `<system-reminder>` blocks),
    /// followed by the text of its `tool_result` blocks.
    pub last_user_text: String,
    /// `messages.len()` (the CLI also sends `role: "system"` messages; they count).
    pub messages_len: usize,
    /// The top-level `system` prompt flattened (a string, or its text blocks joined with
    /// `\n`), followed by the text of any `role: "system"` messages (the CLI 2.1.328 puts
    /// its environment section, cwd included, in such a message).
    pub system_text: String,
    /// `model` of the request (`""` if absent).
    pub model: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// Request headers, names lower-case (repeated headers joined with `, `).
    pub headers: BTreeMap<String, String>,
    /// Index in [`Script::rules`] of the rule that answered, `None` for the fallback.
    pub matched_rule: Option<usize>,
    /// Usage reported in the answer (all 0 for an error reply).
    pub usage: Usage,
}

/// Any other request (side call, probe, count_tokens, unknown path).
#[derive(Clone, Debug)]
pub struct SideRequest {
    /// `GET`, `HEAD`, `POST`, …
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Request headers, names lower-case.
    pub headers: BTreeMap<String, String>,
    /// The JSON body; `Null` when empty, a JSON string when not JSON.
    pub body: Value,
}

/// One `tool_result` block of a user message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolResult {
    /// `tool_use_id`.
    pub tool_use_id: String,
    /// Its content as text.
    pub content: String,
    /// `is_error` (false when absent).
    pub is_error: bool,
}

impl ModelRequest {
    /// Derives the summary fields from a request body (path, headers, rule and usage are
    /// left empty).
    pub fn from_body(body: Value) -> Self {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let last_user = messages.iter().rev().find(|m| role_of(m) == "user");
        let last_user_text = last_user.map(user_input_text).unwrap_or_default();
        let mut system_parts = Vec::new();
        match body.get("system") {
            Some(Value::String(s)) => system_parts.push(s.clone()),
            Some(Value::Array(blocks)) => system_parts.extend(blocks.iter().filter_map(block_text)),
            _ => {}
        }
        for message in messages.iter().filter(|m| role_of(m) == "system") {
            system_parts.push(content_text(message.get("content")));
        }
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Self {
            last_user_text,
            messages_len: messages.len(),
            system_text: system_parts.join("\n"),
            model,
            path: String::new(),
            headers: BTreeMap::new(),
            matched_rule: None,
            usage: Usage::default(),
            body,
        }
    }

    /// The `messages` array (empty if absent).
    pub fn messages(&self) -> &[Value] {
        self.body
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The `tool_result` blocks of the last user message.
    pub fn tool_results(&self) -> Vec<ToolResult> {
        let Some(last) = self.messages().iter().rev().find(|m| role_of(m) == "user") else {
            return Vec::new();
        };
        let Some(blocks) = last.get("content").and_then(Value::as_array) else {
            return Vec::new();
        };
        blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .map(|b| ToolResult {
                tool_use_id: b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                content: content_text(b.get("content")),
                is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            })
            .collect()
    }

    /// Every message's content as text (text, thinking, tool_use input JSON, tool_result
    /// content), one block per line.
    pub fn all_messages_text(&self) -> String {
        let mut out = Vec::new();
        for message in self.messages() {
            match message.get("content") {
                Some(Value::String(s)) => out.push(s.clone()),
                Some(Value::Array(blocks)) => {
                    for block in blocks {
                        match block.get("type").and_then(Value::as_str) {
                            Some("tool_use") => out
                                .push(block.get("input").map(Value::to_string).unwrap_or_default()),
                            Some("tool_result") => out.push(content_text(block.get("content"))),
                            Some("thinking") => out.push(
                                block
                                    .get("thinking")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                            ),
                            _ => out.extend(block_text(block)),
                        }
                    }
                }
                _ => {}
            }
        }
        out.join("\n")
    }

    /// The tool names offered in `tools`.
    pub fn tool_names(&self) -> Vec<String> {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn role_of(message: &Value) -> &str {
    message
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `text` of a `{"type":"text","text":…}` block.
fn block_text(block: &Value) -> Option<String> {
    match block.get("type").and_then(Value::as_str) {
        Some("text") | None => block.get("text").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// A content value (string or list of blocks) as text: text blocks joined with `\n`.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(block_text)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The user's own words in a user message, then its tool results.
fn user_input_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::new();
            for block in blocks {
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_result") => parts.push(content_text(block.get("content"))),
                    _ => {
                        if let Some(text) = block_text(block) {
                            if !text.trim_start().starts_with(SYSTEM_REMINDER) {
                                parts.push(text);
                            }
                        }
                    }
                }
            }
            parts.join("\n")
        }
        _ => String::new(),
    }
}

// ------------------------------------------------------------------------------------------
// Public types: the script
// ------------------------------------------------------------------------------------------

/// Which requests a rule answers.
#[derive(Clone, Debug)]
pub enum Matcher {
    /// [`ModelRequest::last_user_text`] contains the string.
    LastUserContains(String),
    /// Some message (any role, any block: text, tool input, tool result) contains it.
    AnyMessageContains(String),
    /// A `tool_result` block of the last user message contains it (`""`: any tool result).
    ToolResultContains(String),
    /// [`ModelRequest::system_text`] contains it.
    SystemContains(String),
    /// Every request.
    Always,
}

impl Matcher {
    /// Whether the matcher fits the request.
    pub fn matches(&self, request: &ModelRequest) -> bool {
        match self {
            Self::LastUserContains(s) => request.last_user_text.contains(s.as_str()),
            Self::AnyMessageContains(s) => request.all_messages_text().contains(s.as_str()),
            Self::ToolResultContains(s) => request
                .tool_results()
                .iter()
                .any(|r| r.content.contains(s.as_str())),
            Self::SystemContains(s) => request.system_text.contains(s.as_str()),
            Self::Always => true,
        }
    }
}

/// What the fake answers.
#[derive(Clone, Debug)]
pub enum Reply {
    /// One text block, one delta.
    Text(String),
    /// One text block sent as several `text_delta`s.
    TextChunks(Vec<String>),
    /// One `tool_use` block (`stop_reason: tool_use`); the input JSON is sent in pieces.
    ToolUse {
        /// Tool name, e.g. `Bash`.
        name: String,
        /// Tool input.
        input: Value,
    },
    /// A text block, then a `tool_use` block.
    TextThenToolUse {
        /// The text.
        text: String,
        /// Tool name.
        name: String,
        /// Tool input.
        input: Value,
    },
    /// An HTTP error with Anthropic's error body
    /// `{"type":"error","error":{"type":…,"message":…}}`.
    Error {
        /// HTTP status.
        status: u16,
        /// `error.type`, e.g. `overloaded_error`.
        error_type: String,
        /// `error.message`.
        message: String,
    },
    /// Waits, then answers (nothing is sent before the wait ends, not even headers).
    DelayThen(Duration, Box<Reply>),
}

impl Reply {
    /// [`Reply::Text`].
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }

    /// [`Reply::TextChunks`].
    pub fn chunks<I, S>(chunks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::TextChunks(chunks.into_iter().map(Into::into).collect())
    }

    /// [`Reply::ToolUse`].
    pub fn tool_use(name: impl Into<String>, input: Value) -> Self {
        Self::ToolUse {
            name: name.into(),
            input,
        }
    }

    /// A `Bash` tool use running `command`.
    pub fn bash(command: impl Into<String>) -> Self {
        let command = command.into();
        Self::tool_use(
            "Bash",
            json!({ "command": command, "description": "Run a scripted command" }),
        )
    }

    /// [`Reply::TextThenToolUse`].
    pub fn text_then_tool_use(
        text: impl Into<String>,
        name: impl Into<String>,
        input: Value,
    ) -> Self {
        Self::TextThenToolUse {
            text: text.into(),
            name: name.into(),
            input,
        }
    }

    /// [`Reply::Error`].
    pub fn error(status: u16, error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Error {
            status,
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// 529 `overloaded_error` (the CLI retries it).
    pub fn overloaded() -> Self {
        Self::error(529, "overloaded_error", "Overloaded")
    }

    /// 400 `invalid_request_error` (the CLI does not retry it).
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::error(400, "invalid_request_error", message)
    }

    /// This reply after `delay`.
    pub fn after(self, delay: Duration) -> Self {
        Self::DelayThen(delay, Box::new(self))
    }

    /// The total delay and the reply that follows it.
    fn resolve(&self) -> (Duration, &Reply) {
        let mut delay = Duration::ZERO;
        let mut reply = self;
        while let Self::DelayThen(d, inner) = reply {
            delay += *d;
            reply = inner;
        }
        (delay, reply)
    }

    /// The `output_tokens` the fake reports for this reply: one per started 4 bytes of text
    /// and tool input JSON, plus one per block; 0 for an error.
    pub fn output_tokens(&self) -> u64 {
        let (_, reply) = self.resolve();
        let bytes = |n: usize| n.div_ceil(4) as u64;
        match reply {
            Self::Text(text) => 1 + bytes(text.len()),
            Self::TextChunks(chunks) => 1 + bytes(chunks.iter().map(String::len).sum()),
            Self::ToolUse { name, input } => 1 + bytes(name.len() + input.to_string().len()),
            Self::TextThenToolUse { text, name, input } => {
                2 + bytes(text.len()) + bytes(name.len() + input.to_string().len())
            }
            Self::Error { .. } | Self::DelayThen(..) => 0,
        }
    }
}

/// `input_tokens` the fake reports for a request body of `body_len` bytes: one per started
/// 4 bytes.
pub fn input_tokens_for(body_len: usize) -> u64 {
    body_len.div_ceil(4).max(1) as u64
}

/// One rule of a [`Script`].
#[derive(Clone, Debug)]
pub struct Rule {
    /// Which requests it answers.
    pub when: Matcher,
    /// The answer.
    pub reply: Reply,
    /// How many requests it may answer; `None` = unlimited.
    pub times: Option<usize>,
}

impl Rule {
    /// An unlimited rule.
    pub fn new(when: Matcher, reply: Reply) -> Self {
        Self {
            when,
            reply,
            times: None,
        }
    }
}

/// Rules tried in order against each streamed request; the first whose matcher fits (and
/// which is not used up) answers, else the fallback.
#[derive(Clone, Debug)]
pub struct Script {
    /// The rules, in order.
    pub rules: Vec<Rule>,
    /// The answer when no rule fits.
    pub fallback: Reply,
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    /// No rules; the fallback answers `"ok"`.
    pub fn new() -> Self {
        Self {
            rules: Vec::new(),
            fallback: Reply::text("ok"),
        }
    }

    /// Adds an unlimited rule.
    pub fn on(mut self, when: Matcher, reply: Reply) -> Self {
        self.rules.push(Rule::new(when, reply));
        self
    }

    /// Limits the rule added last to `n` uses (`.on_last_user("x", r).times(1)`).
    ///
    /// # Panics
    /// If there is no rule yet.
    pub fn times(mut self, n: usize) -> Self {
        self.rules
            .last_mut()
            .expect("times() needs a rule before it")
            .times = Some(n);
        self
    }

    /// Limits the rule added last to one use.
    pub fn once(self) -> Self {
        self.times(1)
    }

    /// Rule: [`Matcher::LastUserContains`].
    pub fn on_last_user(self, needle: impl Into<String>, reply: Reply) -> Self {
        self.on(Matcher::LastUserContains(needle.into()), reply)
    }

    /// Rule: [`Matcher::AnyMessageContains`].
    pub fn on_any_message(self, needle: impl Into<String>, reply: Reply) -> Self {
        self.on(Matcher::AnyMessageContains(needle.into()), reply)
    }

    /// Rule: [`Matcher::ToolResultContains`].
    pub fn on_tool_result(self, needle: impl Into<String>, reply: Reply) -> Self {
        self.on(Matcher::ToolResultContains(needle.into()), reply)
    }

    /// Rule: [`Matcher::SystemContains`].
    pub fn on_system(self, needle: impl Into<String>, reply: Reply) -> Self {
        self.on(Matcher::SystemContains(needle.into()), reply)
    }

    /// Rule: [`Matcher::Always`], unlimited.
    pub fn always(self, reply: Reply) -> Self {
        self.on(Matcher::Always, reply)
    }

    /// Rule: [`Matcher::Always`] once: a sequence of `.then(…)` answers requests in turn.
    pub fn then(self, reply: Reply) -> Self {
        self.on(Matcher::Always, reply).once()
    }

    /// The network-request exchange the approval tests share: `install requests` makes the
    /// agent ask for `pypi.org` (`[NETWORK_REQUEST: pypi.org]`), and the bot's
    /// `[NETWORK_APPROVED: pypi.org]` gets `Thanks, pypi.org works now.`
    pub fn asks_for_pypi(self) -> Self {
        self.on_last_user(
            "[NETWORK_APPROVED: pypi.org]",
            Reply::text("Thanks, pypi.org works now."),
        )
        .on_last_user(
            "install requests",
            Reply::text("I need the package index first.\n[NETWORK_REQUEST: pypi.org]\n"),
        )
    }

    /// Sets the fallback.
    pub fn fallback(mut self, reply: Reply) -> Self {
        self.fallback = reply;
        self
    }
}

// ------------------------------------------------------------------------------------------
// The server
// ------------------------------------------------------------------------------------------

/// The fake, listening on `127.0.0.1:<free port>`.
pub struct ModelServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Signalled whenever a request is recorded.
    recorded: Notify,
    /// Cancelled by [`ModelServer::stop`] and on drop: cuts delayed answers short.
    shutdown: CancellationToken,
    /// Last `request-id` header value handed out.
    request_ids: AtomicU64,
}

struct Inner {
    script: Script,
    /// Uses of each rule of `script`.
    uses: Vec<usize>,
    requests: Vec<ModelRequest>,
    side: Vec<SideRequest>,
    /// Last `toolu_<n>` handed out.
    tool_ids: u64,
    /// Last `msg_<n>` handed out.
    message_ids: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not make every later call panic too.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ModelServer {
    /// Starts the fake with `script`.
    pub async fn start(script: Script) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind model server");
        let addr = listener.local_addr().expect("model server address");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                uses: vec![0; script.rules.len()],
                script,
                requests: Vec::new(),
                side: Vec::new(),
                tool_ids: 0,
                message_ids: 0,
            }),
            recorded: Notify::new(),
            shutdown: CancellationToken::new(),
            request_ids: AtomicU64::new(0),
        });
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(Arc::clone(&shared));
        let shutdown = shared.shutdown.clone();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Self {
            addr,
            shared,
            shutdown,
            handle: Some(handle),
        }
    }

    /// `http://127.0.0.1:PORT`, the value for `ANTHROPIC_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every streamed `/v1/messages` request so far, in arrival order.
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.shared.lock().requests.clone()
    }

    /// The newest streamed request whose last user text contains `needle`, if any.
    pub fn last_request_with(&self, needle: &str) -> Option<ModelRequest> {
        let inner = self.shared.lock();
        inner
            .requests
            .iter()
            .rev()
            .find(|r| r.last_user_text.contains(needle))
            .cloned()
    }

    /// Every other request so far, in arrival order.
    pub fn side_requests(&self) -> Vec<SideRequest> {
        self.shared.lock().side.clone()
    }

    /// Replaces the script (rule use counts start again from 0; ids keep counting).
    pub fn set_script(&self, script: Script) {
        let mut inner = self.shared.lock();
        inner.uses = vec![0; script.rules.len()];
        inner.script = script;
    }

    /// Forgets the recorded requests (script requests and side requests).
    pub fn clear_requests(&self) {
        let mut inner = self.shared.lock();
        inner.requests.clear();
        inner.side.clear();
    }

    /// Waits until at least `n` script requests were recorded and returns them all.
    ///
    /// # Panics
    /// After `timeout`, listing what did arrive.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<ModelRequest> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.recorded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen: Vec<_> = requests.iter().map(|r| r.last_user_text.clone()).collect();
                panic!(
                    "waited {timeout:?} for {n} model requests; got {}: {seen:?}",
                    seen.len()
                );
            }
        }
    }

    /// Stops listening and cuts delayed answers short; other in-flight answers get a short
    /// grace period, then are aborted.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(mut handle) = self.handle.take() {
            if tokio::time::timeout(STOP_GRACE, &mut handle).await.is_err() {
                handle.abort();
                let _ = handle.await;
            }
        }
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

/// The one handler: sorts script requests from side requests.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let streamed = method == Method::POST
        && uri.path() == "/v1/messages"
        && json
            .as_ref()
            .and_then(|b| b.get("stream"))
            .and_then(Value::as_bool)
            == Some(true);
    let mut response = match json {
        Some(json) if streamed => script_request(&shared, json, body.len(), path, &headers).await,
        json => side_request(&shared, &method, uri.path(), path, &headers, &body, json),
    };
    // The CLI copies this into its `assistant` events as `request_id`.
    let id = shared.request_ids.fetch_add(1, Ordering::Relaxed) + 1;
    if let Ok(value) = HeaderValue::from_str(&format!("req_fake_{id}")) {
        response.headers_mut().insert("request-id", value);
    }
    response
}

/// A recorded, script-matched, streamed answer.
async fn script_request(
    shared: &Shared,
    body: Value,
    body_len: usize,
    path: String,
    headers: &HeaderMap,
) -> Response {
    let mut request = ModelRequest::from_body(body);
    request.path = path;
    request.headers = header_map(headers);
    let (delay, reply, ids) = {
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let matched = inner.script.rules.iter().enumerate().position(|(i, rule)| {
            rule.times.is_none_or(|t| inner.uses[i] < t) && rule.when.matches(&request)
        });
        let reply = match matched {
            Some(i) => {
                inner.uses[i] += 1;
                inner.script.rules[i].reply.clone()
            }
            None => inner.script.fallback.clone(),
        };
        let (delay, reply) = reply.resolve();
        let reply = reply.clone();
        inner.message_ids += 1;
        let message_id = format!("msg_{}", inner.message_ids);
        let tool_id = match reply {
            Reply::ToolUse { .. } | Reply::TextThenToolUse { .. } => {
                inner.tool_ids += 1;
                Some(format!("toolu_{}", inner.tool_ids))
            }
            _ => None,
        };
        if !matches!(reply, Reply::Error { .. }) {
            request.usage = Usage {
                input_tokens: input_tokens_for(body_len),
                output_tokens: reply.output_tokens(),
                ..Usage::default()
            };
        }
        request.matched_rule = matched;
        let ids = (message_id, tool_id, request.model.clone(), request.usage);
        inner.requests.push(request);
        (delay, reply, ids)
    };
    shared.recorded.notify_waiters();
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.shutdown.cancelled() => return cut_response(),
        }
    }
    let (message_id, tool_id, model, usage) = ids;
    if let Reply::Error {
        status,
        error_type,
        message,
    } = &reply
    {
        return error_response(*status, error_type, message);
    }
    let events = sse_events(&reply, &message_id, tool_id.as_deref(), &model, usage);
    let chunks = events.into_iter().map(|(kind, data)| {
        Ok::<_, Infallible>(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
    });
    let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A response whose body fails at once: hyper drops the connection, so the client sees the
/// stream cut (axum's graceful shutdown alone would wait for the delay to end).
fn cut_response() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("model server stopped"))
    });
    let mut response = Response::new(Body::from_stream(failing));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Anthropic's error shape with the given status.
fn error_response(status: u16, error_type: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "type": "error",
        "error": { "type": error_type, "message": message },
    });
    (status, axum::Json(body)).into_response()
}

/// Splits `s` into about `pieces` parts at character boundaries.
fn split_pieces(s: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let size = chars.len().div_ceil(pieces.max(1));
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// The SSE events (type, JSON data) of a non-error reply.
fn sse_events(
    reply: &Reply,
    message_id: &str,
    tool_id: Option<&str>,
    model: &str,
    usage: Usage,
) -> Vec<(&'static str, Value)> {
    let mut events = vec![(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": usage.input_tokens,
                    "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                    "cache_read_input_tokens": usage.cache_read_input_tokens,
                    "output_tokens": 1,
                },
            },
        }),
    )];
    let mut index = 0usize;
    let mut text_block = |events: &mut Vec<(&'static str, Value)>, deltas: &[String]| {
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        for text in deltas {
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    };
    let mut tool = None;
    match reply {
        Reply::Text(text) => text_block(&mut events, std::slice::from_ref(text)),
        Reply::TextChunks(chunks) => text_block(&mut events, chunks),
        Reply::ToolUse { name, input } => tool = Some((name, input)),
        Reply::TextThenToolUse { text, name, input } => {
            text_block(&mut events, std::slice::from_ref(text));
            tool = Some((name, input));
        }
        Reply::Error { .. } | Reply::DelayThen(..) => unreachable!("resolved before"),
    }
    let stop_reason = if let Some((name, input)) = tool {
        events.push((
            "content_block_start",
            json!({
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "tool_use", "id": tool_id.unwrap_or("toolu_0"), "name": name, "input": {}},
            }),
        ));
        for piece in split_pieces(&input.to_string(), 3) {
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        "tool_use"
    } else {
        "end_turn"
    };
    events.push((
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": usage.output_tokens},
        }),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    events
}

/// Records a side request and answers it with something small and valid.
fn side_request(
    shared: &Shared,
    method: &Method,
    bare_path: &str,
    path: String,
    headers: &HeaderMap,
    raw: &Bytes,
    json: Option<Value>,
) -> Response {
    let body = match json {
        Some(v) => v,
        None if raw.is_empty() => Value::Null,
        None => Value::String(String::from_utf8_lossy(raw).into_owned()),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-fake")
        .to_owned();
    shared.lock().side.push(SideRequest {
        method: method.as_str().to_owned(),
        path,
        headers: header_map(headers),
        body,
    });
    shared.recorded.notify_waiters();
    let answer = if *method == Method::POST && bare_path == "/v1/messages/count_tokens" {
        json!({ "input_tokens": input_tokens_for(raw.len()) })
    } else if *method == Method::POST && bare_path == "/v1/messages" {
        let id = {
            let mut inner = shared.lock();
            inner.message_ids += 1;
            format!("msg_{}", inner.message_ids)
        };
        json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": SIDE_REPLY_TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens_for(raw.len()),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        })
    } else {
        json!({})
    };
    (StatusCode::OK, axum::Json(answer)).into_response()
}
