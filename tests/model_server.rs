//! Tests of the scripted fake Anthropic Messages API (`tests/support/model_server.rs`):
//! protocol tests over HTTP, and the real Claude Code CLI driven against it (that one runs
//! against the CLI the testbed installed, or `SM_TEST_CLAUDE_BIN`).

#[path = "support/model_server.rs"]
mod model_server;
#[path = "support/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model_server::{
    input_tokens_for, Matcher, ModelRequest, ModelServer, Reply, Rule, Script, Usage,
};
use serde_json::{json, Value};

// ------------------------------------------------------------------------------------------
// Helpers: a client and an SSE parser
// ------------------------------------------------------------------------------------------

/// One parsed SSE event.
#[derive(Debug)]
struct Event {
    kind: String,
    data: Value,
}

/// Parses a complete SSE body strictly: every event is exactly `event: <type>` then
/// `data: <json>`, events separated by one blank line, and `data.type` equals the event type.
fn parse_sse(body: &str) -> Vec<Event> {
    assert!(
        body.ends_with("\n\n"),
        "body must end with a blank line: {body:?}"
    );
    body.trim_end_matches('\n')
        .split("\n\n")
        .map(|frame| {
            let lines: Vec<&str> = frame.split('\n').collect();
            assert_eq!(
                lines.len(),
                2,
                "frame must be event + data lines: {frame:?}"
            );
            let kind = lines[0]
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no event line: {frame:?}"));
            let data = lines[1]
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no data line: {frame:?}"));
            let data: Value = serde_json::from_str(data).expect("data is JSON");
            assert_eq!(data["type"], kind, "data.type must equal the event type");
            Event {
                kind: kind.to_owned(),
                data,
            }
        })
        .collect()
}

fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

/// A streamed request body with one user message.
fn streamed(content: Value) -> Value {
    json!({
        "model": "claude-test-1",
        "max_tokens": 1024,
        "stream": true,
        "system": [{"type": "text", "text": "You are a test."}],
        "messages": [{"role": "user", "content": content}],
    })
}

/// Posts `body` to `/v1/messages?beta=true`; returns status, content type and body text.
async fn post_messages(server: &ModelServer, body: &Value) -> (u16, String, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/messages?beta=true", server.url()))
        .header("x-api-key", "test")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.expect("body"))
}

/// Posts and parses the SSE answer (asserting 200 and the content type).
async fn stream_reply(server: &ModelServer, body: &Value) -> Vec<Event> {
    let (status, content_type, text) = post_messages(server, body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "text/event-stream");
    parse_sse(&text)
}

/// The concatenated text of all text deltas.
fn reply_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.data["delta"]["type"] == "text_delta")
        .map(|e| e.data["delta"]["text"].as_str().unwrap())
        .collect()
}

fn stop_reason(events: &[Event]) -> String {
    let delta = events.iter().find(|e| e.kind == "message_delta").unwrap();
    delta.data["delta"]["stop_reason"]
        .as_str()
        .unwrap()
        .to_owned()
}

// ------------------------------------------------------------------------------------------
// 1. Protocol tests
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn text_reply_is_framed_as_anthropic_sse() {
    let server = ModelServer::start(
        Script::new()
            .on_last_user("hello", Reply::text("hi there"))
            .fallback(Reply::text("fallback")),
    )
    .await;
    assert!(server.url().starts_with("http://127.0.0.1:"));
    let body = streamed(json!("hello"));
    let body_len = serde_json::to_vec(&body).unwrap().len();
    let events = stream_reply(&server, &body).await;

    assert_eq!(
        kinds(&events),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let message = &events[0].data["message"];
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "claude-test-1");
    assert_eq!(message["content"], json!([]));
    assert_eq!(message["stop_reason"], Value::Null);
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    let usage = &message["usage"];
    assert_eq!(usage["input_tokens"], input_tokens_for(body_len));
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert_eq!(usage["output_tokens"], 1);
    assert_eq!(
        events[1].data["content_block"],
        json!({"type": "text", "text": ""})
    );
    for event in &events[1..4] {
        assert_eq!(event.data["index"], 0);
    }
    assert_eq!(reply_text(&events), "hi there");
    assert_eq!(stop_reason(&events), "end_turn");
    assert_eq!(events[4].data["delta"]["stop_sequence"], Value::Null);
    let output_tokens = Reply::text("hi there").output_tokens();
    assert_eq!(events[4].data["usage"]["output_tokens"], output_tokens);

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.last_user_text, "hello");
    assert_eq!(request.messages_len, 1);
    assert_eq!(request.system_text, "You are a test.");
    assert_eq!(request.model, "claude-test-1");
    assert_eq!(request.path, "/v1/messages?beta=true");
    assert_eq!(request.headers["x-api-key"], "test");
    assert_eq!(request.matched_rule, Some(0));
    assert_eq!(request.body, body);
    assert_eq!(
        request.usage,
        Usage {
            input_tokens: input_tokens_for(body_len),
            output_tokens,
            ..Usage::default()
        }
    );
    assert!(server.side_requests().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn text_chunks_become_several_deltas() {
    let server =
        ModelServer::start(Script::new().always(Reply::chunks(["Hel", "lo, ", "world"]))).await;
    let events = stream_reply(&server, &streamed(json!("hi"))).await;
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "content_block_delta")
        .map(|e| e.data["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["Hel", "lo, ", "world"]);
    assert_eq!(events.len(), 8);
    assert_eq!(stop_reason(&events), "end_turn");
    server.stop().await;
}

#[tokio::test]
async fn tool_use_input_reassembles_from_partial_json() {
    let input = json!({"command": "echo tool-ran > marker.txt", "description": "write a marker ✓"});
    let server = ModelServer::start(
        Script::new()
            .on_last_user("tool", Reply::tool_use("Bash", input.clone()))
            .on_last_user(
                "both",
                Reply::text_then_tool_use(
                    "Let me look.",
                    "Read",
                    json!({"file_path": "/etc/hostname"}),
                ),
            ),
    )
    .await;

    let events = stream_reply(&server, &streamed(json!("run a tool"))).await;
    let start = events
        .iter()
        .find(|e| e.kind == "content_block_start")
        .unwrap();
    assert_eq!(
        start.data["content_block"],
        json!({"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}})
    );
    let pieces: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "content_block_delta")
        .inspect(|e| assert_eq!(e.data["delta"]["type"], "input_json_delta"))
        .map(|e| e.data["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert!(
        pieces.len() > 1,
        "input should arrive in pieces: {pieces:?}"
    );
    assert!(
        pieces
            .iter()
            .all(|p| serde_json::from_str::<Value>(p).is_err()),
        "no piece is whole JSON on its own"
    );
    let joined: Value = serde_json::from_str(&pieces.concat()).unwrap();
    assert_eq!(joined, input);
    assert_eq!(stop_reason(&events), "tool_use");

    let events = stream_reply(&server, &streamed(json!("both please"))).await;
    assert_eq!(
        kinds(&events),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(events[1].data["content_block"]["type"], "text");
    assert_eq!(reply_text(&events), "Let me look.");
    assert_eq!(events[4].data["index"], 1);
    assert_eq!(events[4].data["content_block"]["id"], "toolu_2");
    assert_eq!(events[4].data["content_block"]["name"], "Read");
    let json_text: String = events[5..8]
        .iter()
        .map(|e| e.data["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap(),
        json!({"file_path": "/etc/hostname"})
    );
    assert_eq!(events[8].data["index"], 1);
    assert_eq!(stop_reason(&events), "tool_use");
    server.stop().await;
}

#[tokio::test]
async fn rules_apply_in_order_with_times_and_fallback() {
    let script = Script::new()
        .on_last_user("ping", Reply::text("first pong"))
        .once()
        .on_last_user("ping", Reply::text("later pong"))
        .times(2)
        .on_tool_result("exit 3", Reply::text("the command failed"))
        .on_system("SECRET-MODE", Reply::text("secret"))
        .on_any_message("remember-me", Reply::text("remembered"))
        .fallback(Reply::text("fallback"));
    let server = ModelServer::start(script).await;
    let say = |text: &str| streamed(json!(text));

    for expected in ["first pong", "later pong", "later pong", "fallback"] {
        let events = stream_reply(&server, &say("ping?")).await;
        assert_eq!(reply_text(&events), expected);
    }
    // A tool result is the newest user input.
    let tool_result = json!({
        "model": "m", "stream": true, "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "run it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_9", "name": "Bash", "input": {"command": "false"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_9", "content": [{"type": "text", "text": "Error: exit 3"}], "is_error": true},
                {"type": "text", "text": "<system-reminder>\nping\n</system-reminder>"}
            ]}
        ]
    });
    let events = stream_reply(&server, &tool_result).await;
    assert_eq!(reply_text(&events), "the command failed");
    // System prompt, then an earlier message.
    let mut with_system = say("anything");
    with_system["system"] = json!("Mode: SECRET-MODE");
    assert_eq!(
        reply_text(&stream_reply(&server, &with_system).await),
        "secret"
    );
    let earlier = json!({
        "model": "m", "stream": true, "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "please remember-me"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": "what now"}
        ]
    });
    assert_eq!(
        reply_text(&stream_reply(&server, &earlier).await),
        "remembered"
    );

    let requests = server.requests();
    let matched: Vec<Option<usize>> = requests.iter().map(|r| r.matched_rule).collect();
    assert_eq!(
        matched,
        [Some(0), Some(1), Some(1), None, Some(2), Some(3), Some(4)]
    );
    let results = requests[4].tool_results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].tool_use_id, "toolu_9");
    assert!(results[0].is_error);
    assert_eq!(requests[4].last_user_text, "Error: exit 3");
    assert_eq!(requests[4].messages_len, 3);

    // A new script starts its counts again; `then` answers requests in turn.
    server.set_script(
        Script::new()
            .then(Reply::text("one"))
            .then(Reply::text("two"))
            .on(
                Matcher::LastUserContains("ping".into()),
                Reply::text("pong again"),
            )
            .fallback(Reply::text("done")),
    );
    for expected in ["one", "two", "pong again", "done"] {
        let text = if expected == "pong again" {
            "ping"
        } else {
            "x"
        };
        assert_eq!(
            reply_text(&stream_reply(&server, &say(text)).await),
            expected
        );
    }
    // Struct literals work too.
    server.set_script(Script {
        rules: vec![Rule {
            when: Matcher::Always,
            reply: Reply::text("literal"),
            times: Some(1),
        }],
        fallback: Reply::text("after"),
    });
    assert_eq!(
        reply_text(&stream_reply(&server, &say("x")).await),
        "literal"
    );
    assert_eq!(reply_text(&stream_reply(&server, &say("x")).await), "after");
    assert_eq!(server.requests().len(), 13);
    server.clear_requests();
    assert!(server.requests().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn side_requests_are_answered_and_kept_apart() {
    let server = ModelServer::start(Script::new().always(Reply::text("scripted"))).await;
    let client = reqwest::Client::new();
    let url = server.url();

    // A non-streaming message (title generation and the like).
    let side = json!({"model": "claude-haiku-9", "max_tokens": 50, "messages": [{"role": "user", "content": "title?"}]});
    let response = client
        .post(format!("{url}/v1/messages?beta=true"))
        .json(&side)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "claude-haiku-9");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["content"][0]["type"], "text");
    assert_eq!(message["content"][0]["text"], model_server::SIDE_REPLY_TEXT);
    assert!(message["usage"]["input_tokens"].as_u64().unwrap() > 0);
    // An explicit `"stream": false` is a side call too.
    let mut explicit = side.clone();
    explicit["stream"] = json!(false);
    let message: Value = client
        .post(format!("{url}/v1/messages"))
        .json(&explicit)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(message["type"], "message");

    let counted: Value = client
        .post(format!("{url}/v1/messages/count_tokens?beta=true"))
        .json(&side)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let side_len = serde_json::to_vec(&side).unwrap().len();
    assert_eq!(counted, json!({"input_tokens": input_tokens_for(side_len)}));

    let head = client
        .head(format!("{url}/api/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let get: Value = client
        .get(format!("{url}/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(get, json!({}));
    let other = client
        .post(format!("{url}/v1/other"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);

    // None of them consumed the script or was recorded as a script request.
    assert!(server.requests().is_empty());
    let sides = server.side_requests();
    let seen: Vec<(&str, &str)> = sides
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", "/v1/messages?beta=true"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/messages/count_tokens?beta=true"),
            ("HEAD", "/api/hello"),
            ("GET", "/"),
            ("POST", "/v1/other"),
        ]
    );
    assert_eq!(sides[0].body, side);
    assert_eq!(sides[3].body, Value::Null);
    assert_eq!(sides[5].body, json!("not json"));

    let events = stream_reply(&server, &streamed(json!("now stream"))).await;
    assert_eq!(reply_text(&events), "scripted");
    assert_eq!(server.requests().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn error_replies_use_the_anthropic_shape() {
    let server = ModelServer::start(
        Script::new()
            .on_last_user("busy", Reply::overloaded())
            .once()
            .on_last_user(
                "bad",
                Reply::error(400, "invalid_request_error", "prompt is too long"),
            )
            .fallback(Reply::text("fine")),
    )
    .await;
    let (status, content_type, text) = post_messages(&server, &streamed(json!("busy?"))).await;
    assert_eq!(status, 529);
    assert!(content_type.starts_with("application/json"));
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    // `once`: the retry succeeds.
    let events = stream_reply(&server, &streamed(json!("busy?"))).await;
    assert_eq!(reply_text(&events), "fine");

    let (status, _, text) = post_messages(&server, &streamed(json!("bad input"))).await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["message"], "prompt is too long");

    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].usage, Usage::default());
    assert_ne!(requests[1].usage, Usage::default());
    assert_eq!(requests[2].matched_rule, Some(1));
    server.stop().await;
}

#[tokio::test]
async fn delayed_reply_is_recorded_before_it_is_answered() {
    let server = ModelServer::start(Script::new().always(Reply::DelayThen(
        Duration::from_millis(300),
        Box::new(Reply::text("late").after(Duration::from_millis(100))),
    )))
    .await;
    let url = server.url();
    let started = Instant::now();
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/messages"))
            .json(&streamed(json!("slow")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let seen = server.wait_for_requests(1, Duration::from_secs(5)).await;
    assert_eq!(seen[0].last_user_text, "slow");
    assert!(!request.is_finished(), "the answer waits for the delay");
    let events = parse_sse(&request.await.unwrap());
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(reply_text(&events), "late");
    server.stop().await;
}

#[tokio::test]
async fn stop_does_not_wait_for_a_long_delay() {
    let server = ModelServer::start(
        Script::new().always(Reply::text("never").after(Duration::from_secs(600))),
    )
    .await;
    let url = server.url();
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/messages"))
            .json(&streamed(json!("hang")))
            .send()
            .await?
            .text()
            .await
    });
    server.wait_for_requests(1, Duration::from_secs(5)).await;
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(request.await.unwrap().is_err(), "the connection was cut");
}

#[test]
fn request_summary_fields_follow_the_cli_shapes() {
    // The shape CLI 2.1.328 sends: system blocks, reminders in user messages, a `system`
    // role message carrying the environment.
    let body = json!({
        "model": "claude-opus-5-5",
        "stream": true,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nAttribution…\n</system-reminder>\n"},
                {"type": "text", "text": "hello"}
            ]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment\n - Primary working directory: /w"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt\nb.txt", "is_error": false}
            ]}
        ],
        "tools": [{"name": "Bash", "input_schema": {}}, {"name": "Read", "input_schema": {}}]
    });
    let request = ModelRequest::from_body(body);
    assert_eq!(request.messages_len, 4);
    assert_eq!(request.last_user_text, "a.txt\nb.txt");
    assert_eq!(
        request.system_text,
        "x-anthropic-billing-header: cc_version=2.1.328;\nYou are a Claude agent.\n# Environment\n - Primary working directory: /w"
    );
    assert_eq!(request.model, "claude-opus-5-5");
    assert_eq!(request.tool_names(), ["Bash", "Read"]);
    let all = request.all_messages_text();
    for part in ["hello", "Attribution", "hmm", "\"command\":\"ls\"", "a.txt"] {
        assert!(all.contains(part), "{part} in {all:?}");
    }
    assert!(Matcher::AnyMessageContains("hello".into()).matches(&request));
    assert!(Matcher::ToolResultContains("b.txt".into()).matches(&request));
    assert!(Matcher::ToolResultContains(String::new()).matches(&request));
    assert!(!Matcher::LastUserContains("hello".into()).matches(&request));
    assert!(Matcher::SystemContains("Primary working directory: /w".into()).matches(&request));

    let first_turn = ModelRequest::from_body(json!({"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nping\n</system-reminder>"},
            {"type": "text", "text": "hello"}
        ]},
        {"role": "system", "content": "env"}
    ]}));
    assert_eq!(first_turn.last_user_text, "hello");
    assert!(!Matcher::LastUserContains("ping".into()).matches(&first_turn));
    assert!(!Matcher::ToolResultContains(String::new()).matches(&first_turn));
    assert_eq!(first_turn.system_text, "env");
}

// ------------------------------------------------------------------------------------------
// 2. The real Claude Code CLI against the fake
// ------------------------------------------------------------------------------------------

/// How long to wait for any one line from the CLI.
const CLI_LINE_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `claude -p --input-format stream-json --output-format stream-json` process.
struct ClaudeProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every JSON line read so far.
    transcript: Vec<Value>,
}

impl ClaudeProcess {
    fn spawn(bin: &Path, home: &Path, cwd: &Path, base_url: &str, args: &[&str]) -> Self {
        let mut command = Command::new(bin);
        command
            .args([
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
            ])
            .args(args)
            .current_dir(cwd)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("HOME", home)
            .env("SHELL", "/bin/bash")
            .env("LANG", "C.UTF-8")
            .env("ANTHROPIC_BASE_URL", base_url)
            .env("ANTHROPIC_API_KEY", "test")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn the claude CLI");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            transcript: Vec::new(),
        }
    }

    fn send(&mut self, message: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{message}").expect("write to the CLI");
        stdin.flush().expect("flush");
    }

    fn send_user(&mut self, text: &str) {
        self.send(&json!({"type": "user", "message": {"role": "user", "content": text}}));
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next JSON line (non-JSON lines are reported and skipped).
    async fn next(&mut self) -> Value {
        loop {
            let line = match tokio::time::timeout(CLI_LINE_TIMEOUT, self.lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!("the CLI closed stdout; stderr:\n{}", self.stderr()),
                Err(_) => panic!(
                    "no line from the CLI in {CLI_LINE_TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                ),
            };
            match serde_json::from_str::<Value>(&line) {
                Ok(value) => {
                    eprintln!("CLI> {}", summarize(&value));
                    self.transcript.push(value.clone());
                    return value;
                }
                Err(_) => eprintln!("CLI (not JSON)> {line}"),
            }
        }
    }

    /// Reads until a `result`, answering every `can_use_tool` permission question with
    /// "allow"; returns the lines of the turn, the result last.
    async fn read_turn(&mut self) -> Vec<Value> {
        let mut turn = Vec::new();
        loop {
            let event = self.next().await;
            if event["type"] == "control_request" && event["request"]["subtype"] == "can_use_tool" {
                let answer = json!({
                    "type": "control_response",
                    "response": {
                        "subtype": "success",
                        "request_id": event["request_id"],
                        "response": {"behavior": "allow", "updatedInput": event["request"]["input"]},
                    },
                });
                self.send(&answer);
            }
            let done = event["type"] == "result";
            turn.push(event);
            if done {
                return turn;
            }
        }
    }

    /// Closes stdin and waits for the process to exit.
    async fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the CLI did not exit after stdin closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ClaudeProcess {
    fn drop(&mut self) {
        // SM_TEST_CLAUDE_TRANSCRIPT=<file>: append every JSON line the CLI printed.
        if let Some(path) = std::env::var_os("SM_TEST_CLAUDE_TRANSCRIPT") {
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                for event in &self.transcript {
                    let _ = writeln!(file, "{event}");
                }
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One line describing an event, for the test log.
fn summarize(event: &Value) -> String {
    let kind = event["type"].as_str().unwrap_or("?");
    match kind {
        "system" => format!("system/{}", event["subtype"].as_str().unwrap_or("?")),
        "assistant" | "user" => {
            let blocks: Vec<String> = event["message"]["content"]
                .as_array()
                .map(|blocks| {
                    blocks
                        .iter()
                        .map(|b| match b["type"].as_str() {
                            Some("text") => format!("text {:?}", b["text"].as_str().unwrap_or("")),
                            Some("tool_use") => {
                                format!("tool_use {} {} {}", b["id"], b["name"], b["input"])
                            }
                            Some("tool_result") => format!(
                                "tool_result {} is_error={} {}",
                                b["tool_use_id"], b["is_error"], b["content"]
                            ),
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .unwrap_or_else(|| vec![event["message"]["content"].to_string()]);
            format!("{kind} {blocks:?}")
        }
        "result" => format!(
            "result/{} is_error={} result={} usage={} total_cost_usd={}",
            event["subtype"],
            event["is_error"],
            event["result"],
            event["usage"],
            event["total_cost_usd"]
        ),
        "control_request" => format!("control_request {}", event["request"]),
        _ => format!("{kind} {}", truncate(&event.to_string(), 300)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// Content blocks of the given type across `assistant` (or `user`) events.
fn blocks<'a>(events: &'a [Value], kind: &str, block: &str) -> Vec<&'a Value> {
    of_type(events, kind)
        .into_iter()
        .flat_map(|e| e["message"]["content"].as_array().into_iter().flatten())
        .filter(|b| b["type"] == block)
        .collect()
}

/// The real Claude Code CLI: `SM_TEST_CLAUDE_BIN`, else the one the testbed installed (its
/// env file names it). Panics with what to do when neither is there: these tests never skip.
fn claude_bin() -> PathBuf {
    let bin = std::env::var_os("SM_TEST_CLAUDE_BIN").map_or_else(
        || PathBuf::from(testbed::Testbed::load().get("SM_TEST_CLAUDE_BIN")),
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "the Claude Code CLI {} is not a file; run scripts/testbed (scripts/test does)",
        bin.display()
    );
    bin
}

/// The real CLI: a text turn, a Bash tool turn (permission asked over stdio and granted),
/// then `--resume` in a new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cli_against_the_fake() {
    let bin = claude_bin();
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let session = uuid::Uuid::new_v4().to_string();
    let server = ModelServer::start(
        Script::new()
            .on_last_user("hello", Reply::text("hi from the fake"))
            .on_last_user(
                "make the marker",
                Reply::text_then_tool_use(
                    "Writing the marker.",
                    "Bash",
                    json!({"command": "echo tool-ran > marker.txt && cat marker.txt", "description": "Write the marker file"}),
                ),
            )
            .on_tool_result("tool-ran", Reply::text("the marker is written"))
            .on_last_user("after resume", Reply::chunks(["resumed ", "fine"]))
            .fallback(Reply::text("unexpected request")),
    )
    .await;
    let url = server.url();
    let flags = [
        "--session-id",
        session.as_str(),
        "--permission-prompt-tool",
        "stdio",
    ];
    let mut cli = ClaudeProcess::spawn(&bin, home.path(), cwd.path(), &url, &flags);

    // Turn 1: text.
    cli.send_user("hello");
    let turn1 = cli.read_turn().await;
    let init = of_type(&turn1, "system")
        .into_iter()
        .find(|e| e["subtype"] == "init")
        .expect("system/init");
    assert_eq!(init["session_id"], session.as_str());
    assert!(init["tools"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == "Bash"));
    assert!(init["model"].is_string());
    assert!(init["claude_code_version"].is_string());
    let texts = blocks(&turn1, "assistant", "text");
    assert_eq!(texts.len(), 1, "{turn1:?}");
    assert_eq!(texts[0]["text"], "hi from the fake");
    let result1 = turn1.last().unwrap();
    assert_eq!(result1["subtype"], "success");
    assert_eq!(result1["is_error"], false);
    assert_eq!(result1["result"], "hi from the fake");
    assert_eq!(result1["session_id"], session.as_str());
    assert_eq!(result1["num_turns"], 1);
    assert!(result1["total_cost_usd"].as_f64().unwrap() > 0.0);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let usage1 = requests[0].usage;
    assert_eq!(result1["usage"]["input_tokens"], usage1.input_tokens);
    assert_eq!(result1["usage"]["output_tokens"], usage1.output_tokens);
    assert_eq!(result1["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(result1["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(requests[0].last_user_text, "hello");
    assert!(requests[0].path.starts_with("/v1/messages"));
    eprintln!(
        "request 1: model={} path={} messages_len={} tools={:?}\nheaders={:?}",
        requests[0].model,
        requests[0].path,
        requests[0].messages_len,
        requests[0].tool_names(),
        requests[0].headers
    );

    // Turn 2: the CLI runs a scripted Bash command for real, then sends its result back.
    cli.send_user("please make the marker");
    let turn2 = cli.read_turn().await;
    let tool_uses = blocks(&turn2, "assistant", "tool_use");
    assert_eq!(tool_uses.len(), 1, "{turn2:?}");
    assert_eq!(tool_uses[0]["name"], "Bash");
    let tool_id = tool_uses[0]["id"].as_str().unwrap().to_owned();
    assert!(tool_id.starts_with("toolu_"));
    let asked = of_type(&turn2, "control_request");
    assert_eq!(asked.len(), 1, "one permission question: {turn2:?}");
    assert_eq!(asked[0]["request"]["tool_name"], "Bash");
    let results = blocks(&turn2, "user", "tool_result");
    assert_eq!(results.len(), 1, "{turn2:?}");
    assert_eq!(results[0]["tool_use_id"], tool_id.as_str());
    assert_eq!(results[0]["is_error"], false);
    let marker = std::fs::read_to_string(cwd.path().join("marker.txt")).expect("marker.txt");
    assert_eq!(marker, "tool-ran\n");
    let result2 = turn2.last().unwrap();
    assert_eq!(result2["subtype"], "success");
    assert_eq!(result2["result"], "the marker is written");
    let requests = server.requests();
    assert_eq!(requests.len(), 3, "text turn, tool turn, tool result");
    assert_eq!(requests[1].matched_rule, Some(1));
    assert_eq!(requests[2].matched_rule, Some(2));
    let sent_back = requests[2].tool_results();
    assert_eq!(sent_back.len(), 1);
    assert_eq!(sent_back[0].tool_use_id, tool_id);
    assert!(sent_back[0].content.contains("tool-ran"));
    assert!(requests[2].messages_len > requests[1].messages_len);
    // The result's usage sums the turn's model calls; the cost is cumulative.
    let input: u64 = requests[1..].iter().map(|r| r.usage.input_tokens).sum();
    let output: u64 = requests[1..].iter().map(|r| r.usage.output_tokens).sum();
    assert_eq!(result2["usage"]["input_tokens"], input);
    assert_eq!(result2["usage"]["output_tokens"], output);
    assert_eq!(result2["num_turns"], 2);
    let cost1 = result1["total_cost_usd"].as_f64().unwrap();
    let cost2 = result2["total_cost_usd"].as_f64().unwrap();
    assert!(
        cost2 > cost1,
        "total_cost_usd is cumulative: {cost1} then {cost2}"
    );
    // Each assistant event carries its own call's input usage (the context size).
    let per_call: Vec<u64> = of_type(&turn2, "assistant")
        .iter()
        .map(|e| e["message"]["usage"]["input_tokens"].as_u64().unwrap())
        .collect();
    eprintln!("turn 2 assistant input_tokens per event: {per_call:?}");
    assert_eq!(per_call.last(), Some(&requests[2].usage.input_tokens));
    let exit = cli.finish().await;
    assert!(exit.success(), "exit {exit:?}");

    // A new process resumes the conversation: the next request carries the earlier turns.
    let flags = [
        "--resume",
        session.as_str(),
        "--permission-prompt-tool",
        "stdio",
    ];
    let mut resumed = ClaudeProcess::spawn(&bin, home.path(), cwd.path(), &url, &flags);
    resumed.send_user("after resume");
    let turn3 = resumed.read_turn().await;
    let result3 = turn3.last().unwrap();
    assert_eq!(result3["subtype"], "success", "{turn3:?}");
    assert_eq!(result3["result"], "resumed fine");
    assert_eq!(result3["session_id"], session.as_str());
    let cost3 = result3["total_cost_usd"].as_f64().unwrap();
    eprintln!("total_cost_usd per turn: {cost1} {cost2} {cost3}");
    let requests = server.requests();
    assert_eq!(requests.len(), 4);
    let last = &requests[3];
    assert_eq!(last.last_user_text, "after resume");
    assert!(
        last.messages_len > requests[2].messages_len,
        "{} > {}",
        last.messages_len,
        requests[2].messages_len
    );
    let history = last.all_messages_text();
    for earlier in [
        "hello",
        "hi from the fake",
        "tool-ran",
        "the marker is written",
    ] {
        assert!(
            history.contains(earlier),
            "{earlier:?} missing from the resumed request"
        );
    }
    let exit = resumed.finish().await;
    assert!(exit.success(), "exit {exit:?}");
    eprintln!(
        "side requests: {:?}",
        server
            .side_requests()
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

/// The real CLI meets API errors (a 529 it retries, a 400 it gives up on) and an interrupt
/// while a model call hangs.
///
/// The CLI keeps a failed or interrupted user message and merges the next input into the
/// same `user` message, so `last_user_text` then holds both: the rules for later inputs come
/// first, and the slow rule is used up once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cli_errors_and_interrupt() {
    let bin = claude_bin();
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let session = uuid::Uuid::new_v4().to_string();
    let server = ModelServer::start(
        Script::new()
            .on_last_user("busy", Reply::overloaded())
            .once()
            .on_last_user("busy", Reply::text("made it after a retry"))
            .once()
            .on_last_user(
                "bad request",
                Reply::invalid_request("scripted bad request"),
            )
            .on_last_user(
                "slow",
                Reply::text("too late").after(Duration::from_secs(120)),
            )
            .once()
            .fallback(Reply::text("still here")),
    )
    .await;
    let flags = [
        "--session-id",
        session.as_str(),
        "--permission-prompt-tool",
        "stdio",
    ];
    let mut cli = ClaudeProcess::spawn(&bin, home.path(), cwd.path(), &server.url(), &flags);

    // A 400 the CLI gives up on: an error result carrying the status.
    cli.send_user("bad request please");
    let turn = cli.read_turn().await;
    let result = turn.last().unwrap();
    assert_eq!(result["is_error"], true, "{result}");
    assert_eq!(result["api_error_status"], 400, "{result}");
    let bad_requests = server.requests().len();
    let attempts: Vec<_> = server
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{} retry-count={:?} messages={} max_tokens={}",
                r.model,
                r.headers.get("x-stainless-retry-count"),
                r.messages_len,
                r.body["max_tokens"]
            )
        })
        .collect();
    eprintln!("400: {bad_requests} model requests {attempts:?}");

    // A 529 is retried (a system/api_retry event), then the turn succeeds.
    cli.send_user("busy now?");
    let turn = cli.read_turn().await;
    let result = turn.last().unwrap();
    assert_eq!(result["subtype"], "success", "{result}");
    assert_eq!(result["is_error"], false);
    assert_eq!(result["result"], "made it after a retry");
    assert!(
        of_type(&turn, "system")
            .iter()
            .any(|e| e["subtype"] == "api_retry"),
        "{turn:?}"
    );
    let requests = server.requests();
    assert_eq!(requests.len(), bad_requests + 2);
    // The failed message is still there, merged with the new one.
    assert!(requests[bad_requests]
        .last_user_text
        .contains("bad request please"));
    assert!(requests[bad_requests].last_user_text.contains("busy now?"));

    // Interrupt while the model call hangs.
    let before = server.requests().len();
    cli.send_user("slow answer");
    server
        .wait_for_requests(before + 1, Duration::from_secs(60))
        .await;
    cli.send(&json!({"type": "control_request", "request_id": "int-1", "request": {"subtype": "interrupt"}}));
    let turn = cli.read_turn().await;
    let response = of_type(&turn, "control_response");
    assert_eq!(response.len(), 1, "{turn:?}");
    assert_eq!(response[0]["response"]["subtype"], "success");
    assert_eq!(response[0]["response"]["request_id"], "int-1");
    let texts = blocks(&turn, "user", "text");
    assert!(
        texts
            .iter()
            .any(|b| b["text"] == "[Request interrupted by user]"),
        "{turn:?}"
    );
    let result = turn.last().unwrap();
    assert_eq!(result["subtype"], "error_during_execution", "{result}");
    assert_eq!(result["is_error"], true);

    // The next turn works; its request carries the interrupted input too.
    let before = server.requests().len();
    cli.send_user("are you there");
    let turn = cli.read_turn().await;
    let result = turn.last().unwrap();
    assert_eq!(result["subtype"], "success", "{result}");
    assert_eq!(result["result"], "still here");
    let requests = server.requests();
    assert_eq!(requests.len(), before + 1);
    let last = &requests[before].last_user_text;
    assert!(
        last.contains("are you there") && last.contains("slow answer"),
        "{last:?}"
    );
    let exit = cli.finish().await;
    assert!(exit.success(), "exit {exit:?}");
    server.stop().await;
}

/// The real CLI's side of tool permissions answered from chat: in `acceptEdits` a command
/// asks (`can_use_tool`) with the CLI's own permission suggestions; allowing with them as
/// session rules (`updatedPermissions`, destination `session`) stops it asking for the same
/// command again and writes nothing into the workspace; `set_permission_mode` switches a
/// running process to `plan`, where an edit asks too (and a deny keeps it from happening).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cli_permission_suggestions_and_mode_switch() {
    let bin = claude_bin();
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let session = uuid::Uuid::new_v4().to_string();
    let command = json!({"command": "sh -c 'echo one'", "description": "Print one"});
    let server = ModelServer::start(
        Script::new()
            .on_tool_result("one", Reply::text("written"))
            .on_last_user("write it", Reply::tool_use("Bash", command.clone()))
            .on_last_user(
                "write in plan",
                Reply::tool_use(
                    "Write",
                    json!({"file_path": cwd.path().join("plan.txt").display().to_string(), "content": "x\n"}),
                ),
            )
            .fallback(Reply::text("ok")),
    )
    .await;
    let flags = [
        "--session-id",
        session.as_str(),
        "--permission-prompt-tool",
        "stdio",
        "--permission-mode",
        "acceptEdits",
    ];
    let mut cli = ClaudeProcess::spawn(&bin, home.path(), cwd.path(), &server.url(), &flags);
    // Reads a turn, answering permission questions with `answer`; returns the questions.
    async fn turn(cli: &mut ClaudeProcess, answer: impl Fn(&Value) -> Value) -> Vec<Value> {
        let mut asked = Vec::new();
        loop {
            let event = cli.next().await;
            if event["type"] == "control_request" && event["request"]["subtype"] == "can_use_tool" {
                eprintln!("can_use_tool: {}", event["request"]);
                let response = answer(&event["request"]);
                cli.send(&json!({
                    "type": "control_response",
                    "response": {"subtype": "success", "request_id": event["request_id"], "response": response},
                }));
                asked.push(event["request"].clone());
            }
            if event["type"] == "result" {
                return asked;
            }
        }
    }
    cli.send_user("write it");
    // "For this session": the CLI's suggestion, kept in the session instead of the
    // workspace's settings file the CLI proposes.
    let asked = turn(&mut cli, |request| {
        let mut rules = request["permission_suggestions"].clone();
        for rule in rules.as_array_mut().into_iter().flatten() {
            rule["destination"] = json!("session");
        }
        json!({
            "behavior": "allow",
            "updatedInput": request["input"],
            "updatedPermissions": rules,
        })
    })
    .await;
    assert_eq!(asked.len(), 1, "asked once");
    let suggestions = asked[0]["permission_suggestions"].clone();
    assert!(
        suggestions.as_array().is_some_and(|s| !s.is_empty()),
        "the CLI suggests a rule: {}",
        asked[0]
    );
    cli.send_user("write it again");
    let again = turn(
        &mut cli,
        |_| json!({"behavior": "deny", "message": "should not be asked"}),
    )
    .await;
    assert!(
        again.is_empty(),
        "the suggestion applied: not asked again: {again:?}"
    );
    assert!(
        !cwd.path().join(".claude").exists(),
        "a session rule is not written into the workspace"
    );

    cli.send(&json!({
        "type": "control_request",
        "request_id": "mode-1",
        "request": {"subtype": "set_permission_mode", "mode": "plan"},
    }));
    let answer = loop {
        let event = cli.next().await;
        if event["type"] == "control_response" {
            break event;
        }
    };
    eprintln!("set_permission_mode: {answer}");
    assert_eq!(answer["response"]["subtype"], "success", "{answer}");
    assert_eq!(answer["response"]["request_id"], "mode-1");
    cli.send_user("write in plan");
    let asked = turn(
        &mut cli,
        |_| json!({"behavior": "deny", "message": "asked in plan mode"}),
    )
    .await;
    assert_eq!(asked.len(), 1, "in plan mode an edit asks: {asked:?}");
    assert_eq!(asked[0]["tool_name"], "Write");
    assert_eq!(
        asked[0]["decision_reason_type"], "mode",
        "because of the mode"
    );
    assert!(!cwd.path().join("plan.txt").exists(), "denied: not written");
    let status = cli.finish().await;
    assert!(status.success(), "{status:?}");
}
