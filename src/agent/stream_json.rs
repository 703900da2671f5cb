//! Claude Code's stream-json protocol, both directions (`claude -p --input-format stream-json
//! --output-format stream-json --verbose`; see `shared/reference/claude-code.md`).
//!
//! stdout carries one JSON object per line. [`decode_line`] turns a line into an
//! [`AgentEvent`]; it reads fields by name and tolerates anything else, so a new CLI version
//! that adds fields or event types never breaks a session: unknown types become
//! [`AgentEvent::Other`] and a line that is not JSON is a [`DecodeError`] for the caller to log.
//!
//! stdin takes one JSON object per line: [`user_turn`], [`control_request`] and
//! [`permission_response`] build them.

use serde_json::{json, Map, Value};

/// Token counts of one model call (`usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Uncached input tokens.
    pub input_tokens: i64,
    /// Tokens written to the prompt cache.
    pub cache_creation_input_tokens: i64,
    /// Tokens read from the prompt cache.
    pub cache_read_input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
}

impl Usage {
    /// The context size this call used: input + cache creation + cache read.
    pub fn context_tokens(&self) -> i64 {
        self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
    }

    fn from_value(v: Option<&Value>) -> Option<Self> {
        let v = v?.as_object()?;
        let n = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
        Some(Self {
            input_tokens: n("input_tokens"),
            cache_creation_input_tokens: n("cache_creation_input_tokens"),
            cache_read_input_tokens: n("cache_read_input_tokens"),
            output_tokens: n("output_tokens"),
        })
    }
}

/// One block of an assistant message.
#[derive(Debug, Clone, PartialEq)]
pub enum AssistantBlock {
    /// Text for the user (Markdown).
    Text(String),
    /// A tool call.
    ToolUse {
        /// Tool call id (`toolu_…`).
        id: String,
        /// Tool name, e.g. `Bash`.
        name: String,
        /// Tool input (may be `{}` at first: the CLI can announce a call before its input).
        input: Value,
    },
    /// Anything else (thinking, images, …), by its type.
    Other(String),
}

/// The end of a turn (`result`).
#[derive(Debug, Clone, PartialEq)]
pub struct TurnResult {
    /// `success` or `error_…`.
    pub subtype: String,
    /// Whether the turn failed.
    pub is_error: bool,
    /// The final text, if any.
    pub result: Option<String>,
    /// Model calls in the turn.
    pub num_turns: i64,
    /// The CLI's running cost of the whole conversation, in US dollars (it keeps counting
    /// across `--resume`).
    pub total_cost_usd: Option<f64>,
    /// The cost of this turn alone (sum of `costUSD` in `model_usage_since_last_result`), when
    /// the CLI reports it.
    pub turn_cost_usd: Option<f64>,
    /// Tokens of the turn.
    pub usage: Usage,
    /// Conversation id.
    pub session_id: Option<String>,
}

/// A decoded stdout line.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// `system`/`init`: the process is ready (may repeat per turn in some versions).
    Init {
        /// Conversation id.
        session_id: String,
        /// Model in use.
        model: Option<String>,
        /// CLI version.
        version: Option<String>,
    },
    /// An assistant message (whole, not deltas).
    Assistant {
        /// Message id (several events may share it, one per block).
        message_id: Option<String>,
        /// Its blocks.
        blocks: Vec<AssistantBlock>,
        /// Usage of the call that produced it.
        usage: Option<Usage>,
        /// Set when a subagent (Task tool) wrote it.
        parent_tool_use_id: Option<String>,
    },
    /// Tool results fed back to the model (`user` events with `tool_result` blocks).
    ToolResults {
        /// `(tool_use_id, is_error)` per result.
        results: Vec<(String, bool)>,
    },
    /// `result`: the turn is over.
    Result(TurnResult),
    /// `system`/`compact_boundary`: a compaction happened.
    CompactBoundary,
    /// A control request from the CLI (e.g. `can_use_tool`), to be answered.
    ControlRequest {
        /// Id to answer with.
        request_id: String,
        /// `request.subtype`.
        subtype: String,
        /// The whole `request` object.
        request: Value,
    },
    /// The CLI's answer to a control request we sent.
    ControlResponse {
        /// The id we sent.
        request_id: Option<String>,
        /// `success` or `error`.
        subtype: String,
        /// The whole `response` object.
        response: Value,
    },
    /// Any other event, by `type` (and `subtype` when present).
    Other {
        /// `type`, or `type/subtype`.
        kind: String,
    },
}

/// A stdout line that is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream-json event ({reason}): {excerpt}")]
pub struct DecodeError {
    /// Why.
    pub reason: String,
    /// The start of the line (at most 200 characters).
    pub excerpt: String,
}

/// Decodes one stdout line.
///
/// # Errors
/// [`DecodeError`] when the line is not a JSON object with a `type`.
pub fn decode_line(line: &str) -> Result<AgentEvent, DecodeError> {
    let fail = |reason: &str| DecodeError {
        reason: reason.to_owned(),
        excerpt: line.chars().take(200).collect(),
    };
    let value: Value = serde_json::from_str(line.trim()).map_err(|e| fail(&e.to_string()))?;
    let obj = value.as_object().ok_or_else(|| fail("not an object"))?;
    let kind = str_of(obj, "type").ok_or_else(|| fail("no type"))?;
    let subtype = str_of(obj, "subtype").unwrap_or_default();
    Ok(match (kind, subtype) {
        ("system", "init") => AgentEvent::Init {
            session_id: str_of(obj, "session_id").unwrap_or_default().to_owned(),
            model: str_of(obj, "model").map(str::to_owned),
            version: str_of(obj, "claude_code_version").map(str::to_owned),
        },
        ("system", "compact_boundary") => AgentEvent::CompactBoundary,
        ("assistant", _) => {
            let message = obj.get("message").and_then(Value::as_object);
            let blocks = message
                .and_then(|m| m.get("content"))
                .and_then(Value::as_array)
                .map(|content| content.iter().map(assistant_block).collect())
                .unwrap_or_default();
            AgentEvent::Assistant {
                message_id: message.and_then(|m| str_of(m, "id")).map(str::to_owned),
                blocks,
                usage: Usage::from_value(message.and_then(|m| m.get("usage"))),
                parent_tool_use_id: str_of(obj, "parent_tool_use_id").map(str::to_owned),
            }
        }
        ("user", _) => {
            let results = obj
                .get("message")
                .and_then(|m| m.get("content"))
                .and_then(Value::as_array)
                .map(|content| {
                    content
                        .iter()
                        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                        .map(|b| {
                            (
                                b.get("tool_use_id")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                                b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            AgentEvent::ToolResults { results }
        }
        ("result", subtype) => AgentEvent::Result(TurnResult {
            subtype: subtype.to_owned(),
            is_error: obj
                .get("is_error")
                .and_then(Value::as_bool)
                .unwrap_or(subtype != "success"),
            result: str_of(obj, "result").map(str::to_owned),
            num_turns: obj.get("num_turns").and_then(Value::as_i64).unwrap_or(0),
            total_cost_usd: obj.get("total_cost_usd").and_then(Value::as_f64),
            turn_cost_usd: obj
                .get("model_usage_since_last_result")
                .and_then(Value::as_object)
                .map(|models| {
                    models
                        .values()
                        .filter_map(|m| m.get("costUSD").and_then(Value::as_f64))
                        .sum()
                }),
            usage: Usage::from_value(obj.get("usage")).unwrap_or_default(),
            session_id: str_of(obj, "session_id").map(str::to_owned),
        }),
        ("control_request", _) => {
            let request = obj.get("request").cloned().unwrap_or(Value::Null);
            AgentEvent::ControlRequest {
                request_id: str_of(obj, "request_id").unwrap_or_default().to_owned(),
                subtype: request
                    .get("subtype")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                request,
            }
        }
        ("control_response", _) => {
            let response = obj.get("response").cloned().unwrap_or(Value::Null);
            AgentEvent::ControlResponse {
                request_id: response
                    .get("request_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                subtype: response
                    .get("subtype")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                response,
            }
        }
        (kind, "") => AgentEvent::Other {
            kind: kind.to_owned(),
        },
        (kind, subtype) => AgentEvent::Other {
            kind: format!("{kind}/{subtype}"),
        },
    })
}

fn str_of<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn assistant_block(block: &Value) -> AssistantBlock {
    match block.get("type").and_then(Value::as_str) {
        Some("text") => AssistantBlock::Text(
            block
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        ),
        Some("tool_use") => AssistantBlock::ToolUse {
            id: block
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            name: block
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            input: block.get("input").cloned().unwrap_or_else(|| json!({})),
        },
        Some(other) => AssistantBlock::Other(other.to_owned()),
        None => AssistantBlock::Other(String::new()),
    }
}

/// A user turn for stdin (one line, newline included). Slash commands such as `/compact`
/// travel the same way.
pub fn user_turn(text: &str) -> String {
    line(&json!({ "type": "user", "message": { "role": "user", "content": text } }))
}

/// A control request for stdin, e.g. subtype `initialize` or `interrupt`.
pub fn control_request(request_id: &str, subtype: &str) -> String {
    line(
        &json!({ "type": "control_request", "request_id": request_id, "request": { "subtype": subtype } }),
    )
}

/// The answer to a `can_use_tool` control request: allow with the (possibly updated) input,
/// or deny with a reason.
pub fn permission_response(request_id: &str, allow: Result<&Value, &str>) -> String {
    let response = match allow {
        Ok(input) => json!({ "behavior": "allow", "updatedInput": input }),
        Err(message) => json!({ "behavior": "deny", "message": message }),
    };
    control_response(request_id, &response)
}

/// A successful control response to the CLI's request `request_id`, carrying `response`
/// (for `can_use_tool`: `behavior` allow with `updatedInput` and optionally
/// `updatedPermissions`, or deny with `message`).
pub fn control_response(request_id: &str, response: &Value) -> String {
    line(&json!({
        "type": "control_response",
        "response": { "subtype": "success", "request_id": request_id, "response": response }
    }))
}

/// Switches the permission mode of a running CLI (`set_permission_mode`; the CLI answers with
/// a `control_response` carrying the mode).
pub fn set_permission_mode(request_id: &str, mode: &str) -> String {
    line(&json!({
        "type": "control_request",
        "request_id": request_id,
        "request": { "subtype": "set_permission_mode", "mode": mode }
    }))
}

fn line(value: &Value) -> String {
    let mut s = value.to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_documented_events() {
        let init = r#"{"type":"system","subtype":"init","session_id":"s-1","cwd":"/w","tools":["Bash"],"model":"claude-x","permissionMode":"default","slash_commands":["compact"],"claude_code_version":"2.1.328","extra":1}"#;
        assert_eq!(
            decode_line(init).expect("init"),
            AgentEvent::Init {
                session_id: "s-1".into(),
                model: Some("claude-x".into()),
                version: Some("2.1.328".into())
            }
        );
        let assistant = r#"{"type":"assistant","message":{"id":"msg_1","role":"assistant","model":"m","content":[{"type":"text","text":"Hello"},{"type":"tool_use","id":"toolu_1","name":"Bash","input":{"command":"ls"}},{"type":"thinking","thinking":"..."}],"usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":100,"output_tokens":7}},"session_id":"s-1","uuid":"u","parent_tool_use_id":null}"#;
        match decode_line(assistant).expect("assistant") {
            AgentEvent::Assistant {
                message_id,
                blocks,
                usage,
                parent_tool_use_id,
            } => {
                assert_eq!(message_id.as_deref(), Some("msg_1"));
                assert_eq!(blocks[0], AssistantBlock::Text("Hello".into()));
                assert_eq!(
                    blocks[1],
                    AssistantBlock::ToolUse {
                        id: "toolu_1".into(),
                        name: "Bash".into(),
                        input: json!({"command":"ls"})
                    }
                );
                assert_eq!(blocks[2], AssistantBlock::Other("thinking".into()));
                assert_eq!(usage.expect("usage").context_tokens(), 115);
                assert_eq!(parent_tool_use_id, None);
            }
            other => panic!("{other:?}"),
        }
        let tool_result = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"a\nb","is_error":false}]}}"#;
        assert_eq!(
            decode_line(tool_result).expect("user"),
            AgentEvent::ToolResults {
                results: vec![("toolu_1".into(), false)]
            }
        );
        let result = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":2,"result":"done","session_id":"s-1","total_cost_usd":0.000416,"duration_ms":5,"usage":{"input_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":9},"modelUsage":{}}"#;
        match decode_line(result).expect("result") {
            AgentEvent::Result(r) => {
                assert_eq!(r.subtype, "success");
                assert!(!r.is_error);
                assert_eq!(r.num_turns, 2);
                assert_eq!(r.total_cost_usd, Some(0.000416));
                assert_eq!(r.usage.output_tokens, 9);
                assert_eq!(r.result.as_deref(), Some("done"));
                assert_eq!(r.turn_cost_usd, None);
            }
            other => panic!("{other:?}"),
        }
        let with_turn = r#"{"type":"result","subtype":"success","total_cost_usd":0.21,"model_usage_since_last_result":{"m1":{"costUSD":0.05},"m2":{"costUSD":0.01,"inputTokens":3}}}"#;
        match decode_line(with_turn).expect("result") {
            AgentEvent::Result(r) => {
                assert!((r.turn_cost_usd.expect("turn cost") - 0.06).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        let can_use = r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"rm -rf /"}}}"#;
        assert!(
            matches!(decode_line(can_use), Ok(AgentEvent::ControlRequest { ref subtype, .. }) if subtype == "can_use_tool")
        );
        assert_eq!(
            decode_line(r#"{"type":"system","subtype":"compact_boundary","compact_metadata":{}}"#)
                .expect("compact"),
            AgentEvent::CompactBoundary
        );
    }

    #[test]
    fn unknown_and_broken_lines_never_fail_hard() {
        assert_eq!(
            decode_line(r#"{"type":"system","subtype":"status","x":1}"#).expect("status"),
            AgentEvent::Other {
                kind: "system/status".into()
            }
        );
        assert_eq!(
            decode_line(r#"{"type":"stream_event","event":{}}"#).expect("unknown"),
            AgentEvent::Other {
                kind: "stream_event".into()
            }
        );
        for bad in [
            "",
            "not json",
            "[1,2]",
            r#"{"no":"type"}"#,
            "\u{0}",
            "{\"type\":",
        ] {
            assert!(decode_line(bad).is_err(), "{bad:?}");
        }
        // Wrong field types degrade to defaults instead of failing.
        let odd =
            r#"{"type":"result","subtype":"error_max_turns","usage":"?","total_cost_usd":"x"}"#;
        match decode_line(odd).expect("result") {
            AgentEvent::Result(r) => {
                assert!(r.is_error);
                assert_eq!(r.total_cost_usd, None);
                assert_eq!(r.usage, Usage::default());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stdin_lines_match_the_protocol() {
        let turn = user_turn("hi \"there\"\nsecond line");
        assert!(
            turn.ends_with('\n') && turn.matches('\n').count() == 1,
            "one line: {turn}"
        );
        let v: Value = serde_json::from_str(&turn).expect("json");
        assert_eq!(
            v,
            json!({"type":"user","message":{"role":"user","content":"hi \"there\"\nsecond line"}})
        );
        let v: Value = serde_json::from_str(&control_request("c1", "interrupt")).expect("json");
        assert_eq!(
            v,
            json!({"type":"control_request","request_id":"c1","request":{"subtype":"interrupt"}})
        );
        let input = json!({"command":"ls"});
        let v: Value = serde_json::from_str(&permission_response("r1", Ok(&input))).expect("json");
        assert_eq!(
            v,
            json!({"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"behavior":"allow","updatedInput":{"command":"ls"}}}})
        );
        let v: Value = serde_json::from_str(&permission_response("r2", Err("no"))).expect("json");
        assert_eq!(
            v["response"]["response"],
            json!({"behavior":"deny","message":"no"})
        );
    }
}
