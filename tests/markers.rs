//! Tests for the incremental marker scanner.

use proptest::prelude::*;
use session_manager::agent::markers::{
    Marker, MarkerScanner, MarkerSet, ScanEvent, MAX_MARKER_LINE_BYTES, MAX_TASK_BYTES,
};

const ORCH: MarkerSet = MarkerSet::Orchestrator;
const AGENT: MarkerSet = MarkerSet::Agent;

/// Merges adjacent text events; drops empty text.
fn merge(events: Vec<ScanEvent>) -> Vec<ScanEvent> {
    let mut out: Vec<ScanEvent> = Vec::new();
    for event in events {
        match event {
            ScanEvent::Text(t) if t.is_empty() => {}
            ScanEvent::Text(t) => {
                if let Some(ScanEvent::Text(last)) = out.last_mut() {
                    last.push_str(&t);
                } else {
                    out.push(ScanEvent::Text(t));
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn scan_chunks(set: MarkerSet, chunks: &[&str]) -> Vec<ScanEvent> {
    let mut scanner = MarkerScanner::new(set);
    let mut events = Vec::new();
    for chunk in chunks {
        events.extend(scanner.feed(chunk));
    }
    events.extend(scanner.finish());
    merge(events)
}

fn scan(set: MarkerSet, input: &str) -> Vec<ScanEvent> {
    scan_chunks(set, &[input])
}

fn text(s: &str) -> ScanEvent {
    ScanEvent::Text(s.to_string())
}

fn nr(domain: &str) -> ScanEvent {
    ScanEvent::Marker(Marker::NetworkRequest {
        domain: domain.to_string(),
    })
}

fn create(target: &str, task: &str) -> ScanEvent {
    ScanEvent::Marker(Marker::CreateSession {
        target: target.to_string(),
        task: task.to_string(),
    })
}

fn reviewer(target: &str, task: &str) -> ScanEvent {
    ScanEvent::Marker(Marker::CreateReviewer {
        target: target.to_string(),
        task: task.to_string(),
    })
}

fn stop(prefix: &str) -> ScanEvent {
    ScanEvent::Marker(Marker::StopSession {
        id_prefix: prefix.to_string(),
    })
}

fn status() -> ScanEvent {
    ScanEvent::Marker(Marker::SessionStatus)
}

/// Asserts the line is Malformed (whole input is that line) and returns the reason.
fn malformed_reason(set: MarkerSet, input: &str) -> String {
    let events = scan(set, input);
    match events.as_slice() {
        [ScanEvent::Marker(Marker::Malformed { line, reason })] => {
            assert_eq!(
                line,
                input.trim_end_matches(['\r', '\n']),
                "line of {input:?}"
            );
            assert!(!reason.is_empty());
            reason.clone()
        }
        other => panic!("{input:?}: expected one Malformed, got {other:?}"),
    }
}

fn all_text(events: &[ScanEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ScanEvent::Text(t) => Some(t.as_str()),
            ScanEvent::Marker(_) => None,
        })
        .collect()
}

fn char_boundaries(s: &str) -> Vec<usize> {
    (0..=s.len()).filter(|i| s.is_char_boundary(*i)).collect()
}

// ---------------------------------------------------------------- forms

#[test]
fn network_request() {
    assert_eq!(
        scan(AGENT, "[NETWORK_REQUEST: pypi.org]\n"),
        vec![nr("pypi.org")]
    );
    assert_eq!(
        scan(ORCH, "[NETWORK_REQUEST: pypi.org]\n"),
        vec![nr("pypi.org")]
    );
}

#[test]
fn network_request_spacing_and_trailing_whitespace() {
    assert_eq!(
        scan(AGENT, "[NETWORK_REQUEST:pypi.org]\n"),
        vec![nr("pypi.org")]
    );
    assert_eq!(
        scan(AGENT, "[NETWORK_REQUEST:    pypi.org   ]   \t\n"),
        vec![nr("pypi.org")]
    );
    // The value is raw: validation is the domain module's job.
    assert_eq!(
        scan(AGENT, "[NETWORK_REQUEST: https://x y]\n"),
        vec![nr("https://x y")]
    );
}

#[test]
fn marker_without_newline_is_resolved_by_finish() {
    let mut s = MarkerScanner::new(AGENT);
    assert_eq!(s.feed("[NETWORK_REQUEST: pypi.org]"), vec![]);
    assert_eq!(s.finish(), vec![nr("pypi.org")]);
}

#[test]
fn orchestrator_forms() {
    let input = "[SESSION_STATUS]\n[STOP_SESSION: 1a2b3c4d]\n[CREATE_SESSION: org/repo@branch] do it\n\n[CREATE_REVIEWER: org/repo]\n";
    assert_eq!(
        scan(ORCH, input),
        vec![
            status(),
            stop("1a2b3c4d"),
            create("org/repo@branch", "do it"),
            text("\n"),
            reviewer("org/repo", ""),
        ]
    );
}

#[test]
fn text_before_and_after() {
    assert_eq!(
        scan(
            AGENT,
            "Hello\nI need a package.\n[NETWORK_REQUEST: pypi.org]\nThanks\n"
        ),
        vec![
            text("Hello\nI need a package.\n"),
            nr("pypi.org"),
            text("Thanks\n"),
        ]
    );
    assert_eq!(
        scan(
            AGENT,
            "[NETWORK_REQUEST: a.org]\n[NETWORK_REQUEST: b.org]\nend"
        ),
        vec![nr("a.org"), nr("b.org"), text("end")]
    );
}

#[test]
fn marker_mid_line_is_text() {
    for input in [
        "see [NETWORK_REQUEST: pypi.org]\n",
        "x[NETWORK_REQUEST: pypi.org]\n",
        "`[NETWORK_REQUEST: pypi.org]`\n",
        "> [NETWORK_REQUEST: pypi.org]\n",
        "- [SESSION_STATUS]\n",
    ] {
        assert_eq!(scan(ORCH, input), vec![text(input)], "{input:?}");
    }
}

#[test]
fn leading_whitespace_is_text() {
    for input in [
        " [NETWORK_REQUEST: pypi.org]\n",
        "\t[NETWORK_REQUEST: pypi.org]\n",
        "   [SESSION_STATUS]\n",
        "\u{a0}[SESSION_STATUS]\n",
    ] {
        assert_eq!(scan(ORCH, input), vec![text(input)], "{input:?}");
    }
}

#[test]
fn non_marker_brackets_are_text() {
    for input in [
        "[see below]\n",
        "[NETWORK_REQUESTED: pypi.org]\n",
        "[NETWORK_REQUEST_X: pypi.org]\n",
        "[network_request: pypi.org]\n",
        "[Network_Request: pypi.org]\n",
        "[NETWORK]\n",
        "[\n",
        "[]\n",
        "[[NETWORK_REQUEST: a]\n",
        "[SESSION_STATUSES]\n",
        "[ NETWORK_REQUEST: a]\n",
        "[1] footnote\n",
    ] {
        assert_eq!(scan(ORCH, input), vec![text(input)], "{input:?}");
    }
}

#[test]
fn agent_set_ignores_orchestrator_names() {
    let input = "[CREATE_SESSION: org/repo] task\nmore\n\n[SESSION_STATUS]\n[STOP_SESSION: ab]\n[CREATE_REVIEWER: o/r]\n[STOP_SESSION]\n";
    assert_eq!(scan(AGENT, input), vec![text(input)]);
    // ...while NETWORK_REQUEST still works among them.
    assert_eq!(
        scan(AGENT, "[SESSION_STATUS]\n[NETWORK_REQUEST: pypi.org]\n"),
        vec![text("[SESSION_STATUS]\n"), nr("pypi.org")]
    );
}

// ---------------------------------------------------------------- malformed

#[test]
fn malformed_cases() {
    let cases = [
        "[NETWORK_REQUEST: ]",
        "[NETWORK_REQUEST:]",
        "[NETWORK_REQUEST:    \t ]",
        "[NETWORK_REQUEST]",
        "[NETWORK_REQUEST]\n",
        "[NETWORK_REQUEST: pypi.org] please\n",
        "[NETWORK_REQUEST: pypi.org]]\n",
        "[NETWORK_REQUEST: pypi.org\n",
        "[NETWORK_REQUEST: pypi.org",
        "[NETWORK_REQUEST: [pypi.org]]\n",
        "[NETWORK_REQUEST: a[b]\n",
        "[NETWORK_REQUEST pypi.org]\n",
        "[NETWORK_REQUEST\n",
        "[NETWORK_REQUEST :pypi.org]\n",
        "[SESSION_STATUS: now]\n",
        "[SESSION_STATUS\n",
        "[SESSION_STATUS ]\n",
        "[SESSION_STATUS] now\n",
        "[STOP_SESSION]\n",
        "[STOP_SESSION: ]\n",
        "[STOP_SESSION: abc] x\n",
        "[CREATE_SESSION: ]\n",
        "[CREATE_SESSION]\n",
        "[CREATE_SESSION: org/repo\n",
        "[CREATE_SESSION: [org/repo]] task\n",
        "[CREATE_REVIEWER org/repo]\n",
    ];
    for input in cases {
        malformed_reason(ORCH, input);
    }
    assert_eq!(
        malformed_reason(ORCH, "[NETWORK_REQUEST: ]\n"),
        "empty value"
    );
    assert_eq!(
        malformed_reason(ORCH, "[NETWORK_REQUEST: pypi.org] please\n"),
        "unexpected text after `]`"
    );
    assert_eq!(
        malformed_reason(ORCH, "[NETWORK_REQUEST: pypi.org\n"),
        "missing closing `]`"
    );
    assert_eq!(
        malformed_reason(ORCH, "[NETWORK_REQUEST: [pypi.org]]\n"),
        "`[` inside the value"
    );
}

#[test]
fn malformed_line_has_no_line_end_and_text_around_survives() {
    assert_eq!(
        scan(AGENT, "a\r\n[NETWORK_REQUEST: ]\r\nb\n"),
        vec![
            text("a\r\n"),
            ScanEvent::Marker(Marker::Malformed {
                line: "[NETWORK_REQUEST: ]".to_string(),
                reason: "empty value".to_string(),
            }),
            text("b\n"),
        ]
    );
}

// ---------------------------------------------------------------- fences

#[test]
fn backtick_fence_hides_markers() {
    let input = "```\n[NETWORK_REQUEST: a.org]\n```\n[NETWORK_REQUEST: b.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![text("```\n[NETWORK_REQUEST: a.org]\n```\n"), nr("b.org")]
    );
}

#[test]
fn tilde_fence_with_info_string_hides_markers() {
    let input = "~~~bash\n[NETWORK_REQUEST: a.org]\n~~~\n[NETWORK_REQUEST: b.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![
            text("~~~bash\n[NETWORK_REQUEST: a.org]\n~~~\n"),
            nr("b.org")
        ]
    );
    let input = "```text\n[SESSION_STATUS]\n```   \n[SESSION_STATUS]\n";
    assert_eq!(
        scan(ORCH, input),
        vec![text("```text\n[SESSION_STATUS]\n```   \n"), status()]
    );
}

#[test]
fn longer_and_nested_fences() {
    // A shorter run does not close a longer fence.
    let input = "````\n```\n[NETWORK_REQUEST: a.org]\n```\n[NETWORK_REQUEST: b.org]\n````\n[NETWORK_REQUEST: c.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![
            text("````\n```\n[NETWORK_REQUEST: a.org]\n```\n[NETWORK_REQUEST: b.org]\n````\n"),
            nr("c.org"),
        ]
    );
    // A longer run does close.
    let input = "```\n[NETWORK_REQUEST: a.org]\n`````\n[NETWORK_REQUEST: b.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![text("```\n[NETWORK_REQUEST: a.org]\n`````\n"), nr("b.org")]
    );
    // Tildes do not close a backtick fence and vice versa.
    let input = "```\n~~~\n[NETWORK_REQUEST: a.org]\n```\n~~~~\n[NETWORK_REQUEST: b.org]\n~~~~\n[NETWORK_REQUEST: c.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![
            text("```\n~~~\n[NETWORK_REQUEST: a.org]\n```\n~~~~\n[NETWORK_REQUEST: b.org]\n~~~~\n"),
            nr("c.org"),
        ]
    );
}

#[test]
fn fence_indentation_and_inline_code() {
    // Up to three spaces of indentation still open and close a fence.
    let input = "   ```\n[NETWORK_REQUEST: a.org]\n  ```\n[NETWORK_REQUEST: b.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![
            text("   ```\n[NETWORK_REQUEST: a.org]\n  ```\n"),
            nr("b.org")
        ]
    );
    // Four spaces or a tab: indented code, not a fence.
    for opener in ["    ```\n", "\t```\n"] {
        let input = format!("{opener}[NETWORK_REQUEST: a.org]\n");
        assert_eq!(
            scan(AGENT, &input),
            vec![text(opener), nr("a.org")],
            "{opener:?}"
        );
    }
    // Backtick info strings may not contain backticks: inline code.
    let input = "```rm -rf```\n[NETWORK_REQUEST: a.org]\n";
    assert_eq!(
        scan(AGENT, input),
        vec![text("```rm -rf```\n"), nr("a.org")]
    );
    // Two backticks are not a fence.
    let input = "``\n[NETWORK_REQUEST: a.org]\n";
    assert_eq!(scan(AGENT, input), vec![text("``\n"), nr("a.org")]);
    // Tilde info strings may contain backticks.
    let input = "~~~ `x`\n[NETWORK_REQUEST: a.org]\n";
    assert_eq!(scan(AGENT, input), vec![text(input)]);
    // A closing line with text after the run does not close.
    let input = "```\n``` not closed\n[NETWORK_REQUEST: a.org]\n";
    assert_eq!(scan(AGENT, input), vec![text(input)]);
}

#[test]
fn fence_with_crlf() {
    let input = "```\r\n[NETWORK_REQUEST: a.org]\r\n```\r\n[NETWORK_REQUEST: b.org]\r\n";
    assert_eq!(
        scan(AGENT, input),
        vec![
            text("```\r\n[NETWORK_REQUEST: a.org]\r\n```\r\n"),
            nr("b.org")
        ]
    );
}

#[test]
fn unclosed_fence_lasts_until_finish_or_reset() {
    let mut s = MarkerScanner::new(AGENT);
    let mut events = s.feed("```\n");
    events.extend(s.feed("[NETWORK_REQUEST: a.org]\n"));
    events.extend(s.finish());
    assert_eq!(merge(events), vec![text("```\n[NETWORK_REQUEST: a.org]\n")]);
    // finish() closed the fence: a new turn sees markers again.
    assert_eq!(s.feed("[NETWORK_REQUEST: b.org]\n"), vec![nr("b.org")]);

    s.feed("~~~\n");
    s.reset();
    assert_eq!(s.feed("[NETWORK_REQUEST: c.org]\n"), vec![nr("c.org")]);
}

#[test]
fn reset_discards_held_text() {
    let mut s = MarkerScanner::new(AGENT);
    assert_eq!(s.feed("[NETWORK_REQ"), vec![]);
    s.reset();
    assert_eq!(s.feed("hi\n"), vec![text("hi\n")]);
    assert_eq!(s.finish(), vec![]);
}

// ---------------------------------------------------------------- tasks

#[test]
fn task_spans_lines_up_to_blank_line() {
    let input = "Plan:\n[CREATE_SESSION: org/repo@main] Fix the parser.\nIt fails on empty input.\n  - add a test\n\nDone.\n";
    assert_eq!(
        scan(ORCH, input),
        vec![
            text("Plan:\n"),
            create(
                "org/repo@main",
                "Fix the parser.\nIt fails on empty input.\n  - add a test"
            ),
            text("\nDone.\n"),
        ]
    );
}

#[test]
fn task_may_start_on_next_line_and_blank_may_be_whitespace() {
    let input = "[CREATE_REVIEWER: org/repo]\nReview PR 12.\nBe strict.\n \t \nafter\n";
    assert_eq!(
        scan(ORCH, input),
        vec![
            reviewer("org/repo", "Review PR 12.\nBe strict."),
            text(" \t \nafter\n")
        ]
    );
}

#[test]
fn task_at_end_of_stream() {
    let mut s = MarkerScanner::new(ORCH);
    assert_eq!(
        s.feed("[CREATE_REVIEWER: org/repo]\nReview PR 12\n"),
        vec![]
    );
    assert_eq!(s.feed("and PR 13"), vec![]);
    assert_eq!(
        s.finish(),
        vec![reviewer("org/repo", "Review PR 12\nand PR 13")]
    );
}

#[test]
fn empty_task() {
    assert_eq!(
        scan(ORCH, "[CREATE_SESSION: org/repo]\n\nx\n"),
        vec![create("org/repo", ""), text("\nx\n")]
    );
    assert_eq!(
        scan(ORCH, "[CREATE_SESSION: org/repo]"),
        vec![create("org/repo", "")]
    );
    assert_eq!(
        scan(ORCH, "[CREATE_SESSION: org/repo]   \n\n"),
        vec![create("org/repo", ""), text("\n")]
    );
}

#[test]
fn task_lines_are_not_interpreted() {
    let input =
        "[CREATE_SESSION: o/r] Do this:\n[NETWORK_REQUEST: pypi.org]\n```\n\n[SESSION_STATUS]\n";
    assert_eq!(
        scan(ORCH, input),
        vec![
            create("o/r", "Do this:\n[NETWORK_REQUEST: pypi.org]\n```"),
            text("\n"),
            status(),
        ]
    );
}

#[test]
fn task_with_crlf() {
    let input = "[CREATE_SESSION: o/r] one\r\ntwo\r\n\r\nrest\r\n";
    assert_eq!(
        scan(ORCH, input),
        vec![create("o/r", "one\ntwo"), text("\r\nrest\r\n")]
    );
}

#[test]
fn two_sessions_back_to_back() {
    let input = "[CREATE_SESSION: a/b] first\n\n[CREATE_SESSION: c/d] second\nline\n";
    assert_eq!(
        scan(ORCH, input),
        vec![
            create("a/b", "first"),
            text("\n"),
            create("c/d", "second\nline")
        ]
    );
}

#[test]
fn task_held_until_blank_line() {
    let mut s = MarkerScanner::new(ORCH);
    assert_eq!(
        s.feed("intro\n[CREATE_SESSION: a/b] t"),
        vec![text("intro\n")]
    );
    assert_eq!(s.feed("ask\nmore\n"), vec![]);
    assert_eq!(
        s.feed("\nafter"),
        vec![create("a/b", "task\nmore"), text("\nafter")]
    );
    assert_eq!(s.finish(), vec![]);
}

#[test]
fn long_first_task_line_is_kept() {
    // Only the `[NAME: value]` head has to fit in the marker line limit.
    let long = "x".repeat(MAX_MARKER_LINE_BYTES * 2);
    let input = format!("[CREATE_SESSION: a/b] {long}\nnext\n\nend\n");
    let expected = vec![create("a/b", &format!("{long}\nnext")), text("\nend\n")];
    assert_eq!(scan(ORCH, &input), expected);
    assert_eq!(scan_chunks(ORCH, &byte_chunks(&input, 1000)), expected);
}

fn byte_chunks(s: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (a, b) = rest.split_at(cut);
        out.push(a);
        rest = b;
    }
    out
}

#[test]
fn create_head_over_line_limit_is_text() {
    let target = "t".repeat(MAX_MARKER_LINE_BYTES);
    let input = format!("[CREATE_SESSION: {target}] task\nmore\n");
    assert_eq!(scan(ORCH, &input), vec![text(&input)]);
    for size in [1, 100, 4096, 5000] {
        assert_eq!(
            scan_chunks(ORCH, &byte_chunks(&input, size)),
            vec![text(&input)]
        );
    }
    // A head of exactly the limit still counts.
    let head = "[CREATE_SESSION: ]";
    let target = "t".repeat(MAX_MARKER_LINE_BYTES - head.len());
    let input = format!("[CREATE_SESSION: {target}] task\n\n");
    assert_eq!(
        scan(ORCH, &input),
        vec![create(&target, "task"), text("\n")]
    );
}

#[test]
fn task_capture_is_bounded() {
    let line = format!("{}\n", "y".repeat(99)); // 100 bytes per line
    let lines = MAX_TASK_BYTES / 100 + 5;
    let body = line.repeat(lines);
    let input = format!("[CREATE_SESSION: a/b]\n{body}\n[NETWORK_REQUEST: z.org]\n");
    let events = scan(ORCH, &input);
    let kept = MAX_TASK_BYTES / 100;
    let expected_task = line.repeat(kept);
    let rest = line.repeat(lines - kept);
    assert_eq!(
        events,
        vec![
            create("a/b", expected_task.trim()),
            text(&format!("{rest}\n")),
            nr("z.org"),
        ]
    );
    // Same result however it is split.
    for size in [1, 7, 100, 4096] {
        assert_eq!(
            scan_chunks(ORCH, &byte_chunks(&input, size)),
            events,
            "{size}"
        );
    }
}

#[test]
fn task_first_line_over_limit_becomes_text() {
    let long = "z".repeat(MAX_TASK_BYTES + 10);
    let input = format!("[CREATE_SESSION: a/b] {long}\nnext\n");
    let expected = vec![create("a/b", ""), text(&format!(" {long}\nnext\n"))];
    assert_eq!(scan(ORCH, &input), expected);
    assert_eq!(scan_chunks(ORCH, &byte_chunks(&input, 333)), expected);
}

#[test]
fn line_over_task_limit_is_scanned_normally() {
    let long = "w".repeat(MAX_TASK_BYTES - 10);
    // The second line would cross the limit; it is a marker on its own.
    let input =
        format!("[CREATE_SESSION: a/b]\n{long}\n[NETWORK_REQUEST: q.org] and more text\nx\n");
    let events = scan(ORCH, &input);
    assert_eq!(
        events,
        vec![
            create("a/b", &long),
            ScanEvent::Marker(Marker::Malformed {
                line: "[NETWORK_REQUEST: q.org] and more text".to_string(),
                reason: "unexpected text after `]`".to_string(),
            }),
            text("x\n"),
        ]
    );
    assert_eq!(scan_chunks(ORCH, &byte_chunks(&input, 5)), events);
}

// ---------------------------------------------------------------- CRLF

#[test]
fn crlf_line_ends() {
    assert_eq!(
        scan(AGENT, "hi\r\n[NETWORK_REQUEST: pypi.org]\r\nok\r\n"),
        vec![text("hi\r\n"), nr("pypi.org"), text("ok\r\n")]
    );
    assert_eq!(scan(ORCH, "[SESSION_STATUS]\r\n"), vec![status()]);
    assert_eq!(scan(ORCH, "[STOP_SESSION: ab]\r\n"), vec![stop("ab")]);
    // Split between `\r` and `\n`.
    assert_eq!(
        scan_chunks(AGENT, &["[NETWORK_REQUEST: pypi.org]\r", "\nok"]),
        vec![nr("pypi.org"), text("ok")]
    );
    // A lone `\r` is not a line end.
    let input = "a\r[NETWORK_REQUEST: pypi.org]\n";
    assert_eq!(scan(AGENT, input), vec![text(input)]);
}

// ---------------------------------------------------------------- latency

#[test]
fn text_is_emitted_immediately_when_it_cannot_be_a_marker() {
    let mut s = MarkerScanner::new(AGENT);
    assert_eq!(s.feed("hello wor"), vec![text("hello wor")]);
    assert_eq!(s.feed("ld [NETWORK_REQ"), vec![text("ld [NETWORK_REQ")]);
    assert_eq!(s.feed("\n"), vec![text("\n")]);
    assert_eq!(s.feed("[NETW"), vec![]);
    assert_eq!(s.feed("ORK_REQUESTED"), vec![text("[NETWORK_REQUESTED")]);
    assert_eq!(s.feed(" more"), vec![text(" more")]);
    assert_eq!(s.feed("\n["), vec![text("\n")]);
    assert_eq!(s.feed("s"), vec![text("[s")]);
    assert_eq!(s.feed("ee]\n"), vec![text("ee]\n")]);
    assert_eq!(s.feed("[NETWORK_REQUEST: py"), vec![]);
    assert_eq!(s.feed("pi.org]"), vec![]);
    assert_eq!(s.feed("\n"), vec![nr("pypi.org")]);
    assert_eq!(s.finish(), vec![]);
}

#[test]
fn orchestrator_names_are_held_only_by_orchestrator() {
    let mut agent = MarkerScanner::new(AGENT);
    assert_eq!(agent.feed("[SESS"), vec![text("[SESS")]);
    let mut orch = MarkerScanner::new(ORCH);
    assert_eq!(orch.feed("[SESS"), vec![]);
    assert_eq!(orch.feed("ION_STATUS]"), vec![]);
    assert_eq!(orch.finish(), vec![status()]);
}

#[test]
fn text_inside_fence_is_not_held() {
    let mut s = MarkerScanner::new(AGENT);
    assert_eq!(s.feed("```\n"), vec![text("```\n")]);
    assert_eq!(s.feed("[NETW"), vec![text("[NETW")]);
}

#[test]
fn complete_lines_are_emitted_on_newline() {
    let mut s = MarkerScanner::new(AGENT);
    assert_eq!(s.feed("["), vec![]);
    assert_eq!(s.feed("\n"), vec![text("[\n")]);
    assert_eq!(s.feed("[NETWORK_REQUEST"), vec![]);
    assert_eq!(
        s.feed("\n"),
        vec![ScanEvent::Marker(Marker::Malformed {
            line: "[NETWORK_REQUEST".to_string(),
            reason: "expected `:` right after `NETWORK_REQUEST`".to_string(),
        })]
    );
}

#[test]
fn long_partial_line_is_flushed() {
    let mut s = MarkerScanner::new(AGENT);
    let head = "[NETWORK_REQUEST: ";
    assert_eq!(s.feed(head), vec![]);
    let fill = "a".repeat(MAX_MARKER_LINE_BYTES - head.len());
    assert_eq!(s.feed(&fill), vec![], "exactly at the limit: still held");
    assert_eq!(
        s.feed("b"),
        vec![text(&format!("{head}{fill}b"))],
        "one byte over: flushed"
    );
    assert_eq!(s.feed("]\n"), vec![text("]\n")]);
}

#[test]
fn marker_line_length_limit_is_consistent() {
    let head = "[NETWORK_REQUEST: ";
    let at_limit = format!(
        "{head}{}]",
        "a".repeat(MAX_MARKER_LINE_BYTES - head.len() - 1)
    );
    assert_eq!(at_limit.len(), MAX_MARKER_LINE_BYTES);
    let value = at_limit[head.len()..at_limit.len() - 1].to_string();
    assert_eq!(scan(AGENT, &format!("{at_limit}\n")), vec![nr(&value)]);
    // With `\r\n` the `\r` counts: one byte too many.
    let crlf = format!("{at_limit}\r\n");
    assert_eq!(scan(AGENT, &crlf), vec![text(&crlf)]);
    let over = format!("{head}{}]\n", "a".repeat(MAX_MARKER_LINE_BYTES));
    assert_eq!(scan(AGENT, &over), vec![text(&over)]);
    for size in [1, 64, 4095, 4096, 4097] {
        assert_eq!(
            scan_chunks(AGENT, &byte_chunks(&crlf, size)),
            vec![text(&crlf)]
        );
        assert_eq!(
            scan_chunks(AGENT, &byte_chunks(&format!("{at_limit}\n"), size)),
            vec![nr(&value)]
        );
    }
}

// ---------------------------------------------------------------- splits

const SAMPLE: &str = "Héllo wörld 🦀\n[NETWORK_REQUEST: pypi.org]\n```py\n[NETWORK_REQUEST: no.org]\n```\n[SESSION_STATUS]\r\n[CREATE_SESSION: org/répo@main] Build 🦀\nsecond line\n\n[STOP_SESSION: 1a2b]\n[NETWORK_REQUEST: ]\n~~~\n[SESSION_STATUS]\n~~~~ \nend [NETWORK_REQUEST: x]\n[CREATE_REVIEWER: a/b]\ntail";

#[test]
fn sample_expected_events() {
    assert_eq!(
        scan(ORCH, SAMPLE),
        vec![
            text("Héllo wörld 🦀\n"),
            nr("pypi.org"),
            text("```py\n[NETWORK_REQUEST: no.org]\n```\n"),
            status(),
            create("org/répo@main", "Build 🦀\nsecond line"),
            text("\n"),
            stop("1a2b"),
            ScanEvent::Marker(Marker::Malformed {
                line: "[NETWORK_REQUEST: ]".to_string(),
                reason: "empty value".to_string(),
            }),
            text("~~~\n[SESSION_STATUS]\n~~~~ \nend [NETWORK_REQUEST: x]\n"),
            reviewer("a/b", "tail"),
        ]
    );
}

#[test]
fn every_single_split_point_gives_the_same_events() {
    for set in [AGENT, ORCH] {
        let whole = scan(set, SAMPLE);
        for i in char_boundaries(SAMPLE) {
            let (a, b) = SAMPLE.split_at(i);
            assert_eq!(scan_chunks(set, &[a, b]), whole, "{set:?} split at {i}");
        }
    }
}

#[test]
fn every_pair_of_split_points_gives_the_same_events() {
    let sample = "a\n[NETWORK_REQUEST: pé.org]\r\n```\n[SESSION_STATUS]\n```\n[CREATE_SESSION: o/r] t\nu\n\nz";
    for set in [AGENT, ORCH] {
        let whole = scan(set, sample);
        let cuts = char_boundaries(sample);
        for (n, &i) in cuts.iter().enumerate() {
            for &j in &cuts[n..] {
                let chunks = [&sample[..i], &sample[i..j], &sample[j..]];
                assert_eq!(scan_chunks(set, &chunks), whole, "{set:?} split at {i},{j}");
            }
        }
    }
}

#[test]
fn char_by_char_gives_the_same_events() {
    for set in [AGENT, ORCH] {
        let chars: Vec<String> = SAMPLE.chars().map(String::from).collect();
        let chunks: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(scan_chunks(set, &chunks), scan(set, SAMPLE));
    }
}

#[test]
fn empty_chunks_are_harmless() {
    let mut s = MarkerScanner::new(AGENT);
    assert_eq!(s.feed(""), vec![]);
    assert_eq!(s.feed("[NET"), vec![]);
    assert_eq!(s.feed(""), vec![]);
    assert_eq!(s.finish(), vec![text("[NET")]);
    assert_eq!(s.finish(), vec![]);
}

#[test]
fn text_is_the_input_minus_marker_and_task_lines() {
    let events = scan(ORCH, SAMPLE);
    let expected: String = [
        "Héllo wörld 🦀\n",
        "```py\n[NETWORK_REQUEST: no.org]\n```\n",
        "\n",
        "~~~\n[SESSION_STATUS]\n~~~~ \nend [NETWORK_REQUEST: x]\n",
    ]
    .concat();
    assert_eq!(all_text(&events), expected);
    assert_eq!(
        all_text(&scan(ORCH, "no markers at all\n")),
        "no markers at all\n"
    );
}

// ---------------------------------------------------------------- properties

const FRAGMENTS: &[&str] = &[
    "[",
    "]",
    ":",
    ": ",
    " ",
    "\t",
    "\n",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    "`",
    "```",
    "````",
    "~",
    "~~~",
    "   ",
    "a",
    "x.org",
    "org/repo",
    "é",
    "日本",
    "🦀",
    "NETWORK_REQUEST",
    "NETWORK_",
    "REQUEST",
    "CREATE_SESSION",
    "CREATE_REVIEWER",
    "CREATE_",
    "SESSION_STATUS",
    "STOP_SESSION",
    "SESSION",
    "[NETWORK_REQUEST: ",
    "[CREATE_SESSION: ",
    "[CREATE_REVIEWER: a/b]",
    "[SESSION_STATUS]",
    "[STOP_SESSION: 12ab]",
];

fn fragment_string(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..max).prop_map(|v| v.concat())
}

/// Like [`fragment_string`] plus big pieces, so that lines cross the
/// marker-line limit and tasks cross the task limit.
fn long_fragment_string() -> impl Strategy<Value = String> {
    let big = prop_oneof![
        Just("x".repeat(1500)),
        Just(format!("{}\n", "y".repeat(4000))),
        Just("é".repeat(1100)),
    ];
    let small = prop::sample::select(FRAGMENTS).prop_map(str::to_string);
    prop::collection::vec(prop_oneof![3 => small, 1 => big], 0..40).prop_map(|v| v.concat())
}

fn set_strategy() -> impl Strategy<Value = MarkerSet> {
    prop_oneof![Just(AGENT), Just(ORCH)]
}

/// Splits `s` at the char boundaries nearest to the given fractions.
fn split_at_fractions<'a>(s: &'a str, fractions: &[f64]) -> Vec<&'a str> {
    let mut cuts: Vec<usize> = fractions
        .iter()
        .map(|f| {
            let mut i = ((s.len() as f64) * f) as usize;
            i = i.min(s.len());
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            i
        })
        .collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for cut in cuts {
        out.push(&s[prev..cut]);
        prev = cut;
    }
    out.push(&s[prev..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_split_equals_whole(
        input in fragment_string(60),
        set in set_strategy(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..12),
    ) {
        let chunks = split_at_fractions(&input, &fractions);
        prop_assert_eq!(scan_chunks(set, &chunks), scan(set, &input));
    }

    #[test]
    fn char_by_char_equals_whole(input in fragment_string(40), set in set_strategy()) {
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let chunks: Vec<&str> = chars.iter().map(String::as_str).collect();
        prop_assert_eq!(scan_chunks(set, &chunks), scan(set, &input));
    }

    #[test]
    fn without_markers_text_is_the_input(
        input in fragment_string(60),
        set in set_strategy(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..8),
    ) {
        let events = scan_chunks(set, &split_at_fractions(&input, &fractions));
        if events.iter().all(|e| matches!(e, ScanEvent::Text(_))) {
            prop_assert_eq!(all_text(&events), input);
        }
    }

    #[test]
    fn text_is_a_sequence_of_whole_input_lines(input in fragment_string(60), set in set_strategy()) {
        // Text events never split or reorder input: the text is the input with
        // whole lines removed (marker lines and task lines).
        let events = scan(set, &input);
        let text = all_text(&events);
        let mut lines = input.split_inclusive('\n');
        for kept in text.split_inclusive('\n') {
            let found = lines.any(|l| l == kept || (!kept.ends_with('\n') && l.starts_with(kept)));
            prop_assert!(found, "text line {:?} not found in order in {:?}", kept, input);
        }
        let markers = events.iter().filter(|e| matches!(e, ScanEvent::Marker(_))).count();
        if markers == 0 {
            prop_assert_eq!(text, input);
        }
    }

    #[test]
    fn never_panics_on_arbitrary_text(
        input in any::<String>(),
        set in set_strategy(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..8),
    ) {
        let chunks = split_at_fractions(&input, &fractions);
        prop_assert_eq!(scan_chunks(set, &chunks), scan(set, &input));
    }

    #[test]
    fn long_lines_any_split_equals_whole(
        input in long_fragment_string(),
        set in set_strategy(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..40),
    ) {
        let chunks = split_at_fractions(&input, &fractions);
        let whole = scan(set, &input);
        prop_assert_eq!(scan_chunks(set, &chunks), whole.clone());
        for event in &whole {
            if let ScanEvent::Marker(Marker::CreateSession { task, .. } | Marker::CreateReviewer { task, .. }) = event {
                prop_assert!(task.len() <= MAX_TASK_BYTES);
            }
        }
    }

    #[test]
    fn lines_near_the_limits_any_split_equals_whole(
        prefix in prop::sample::select(vec![
            "", "[CREATE_SESSION: ", "[CREATE_REVIEWER: a/b] ", "[NETWORK_REQUEST: ",
            "[SESSION_STATUS", "[STOP_SESSION: ", "[CREATE_SESSION: a/b]\n", "```\n",
        ]),
        filler_len in (MAX_MARKER_LINE_BYTES - 40)..(MAX_MARKER_LINE_BYTES + 40),
        filler_char in prop::sample::select(vec!["x", " ", "é"]),
        suffix in prop::sample::select(vec!["", "]", "] task", "]\n", "\n", "\r\n", "]\r\n\n"]),
        tail in fragment_string(10),
        repeat in 1usize..6,
        cut_near in (MAX_MARKER_LINE_BYTES - 30)..(MAX_MARKER_LINE_BYTES + 60),
        set in set_strategy(),
        fractions in prop::collection::vec(0.0f64..1.0, 0..10),
    ) {
        let mut filler = String::new();
        while filler.len() < filler_len {
            filler.push_str(filler_char);
        }
        let line = format!("{prefix}{filler}{suffix}");
        let input = format!("{}{tail}", line.repeat(repeat));
        // Also cut right around the limit, where holding stops.
        let mut fractions = fractions;
        if !input.is_empty() {
            fractions.push((cut_near as f64) / (input.len() as f64));
        }
        let chunks = split_at_fractions(&input, &fractions);
        prop_assert_eq!(scan_chunks(set, &chunks), scan(set, &input));
    }

    #[test]
    fn malformed_lines_start_with_a_known_name(input in fragment_string(60)) {
        for event in scan(ORCH, &input) {
            if let ScanEvent::Marker(Marker::Malformed { line, .. }) = event {
                prop_assert!(
                    ["[NETWORK_REQUEST", "[CREATE_SESSION", "[CREATE_REVIEWER", "[SESSION_STATUS", "[STOP_SESSION"]
                        .iter()
                        .any(|p| line.starts_with(p)),
                    "{:?}", line
                );
                prop_assert!(!line.contains('\n'));
            }
        }
    }
}
