//! Rendering of agent output into chat posts.
//!
//! This module is pure (no I/O, no clock of its own) and has three parts:
//!
//! * [`split_message`] cuts a long Markdown text into parts that each fit a
//!   post, preferring natural boundaries and keeping fenced code blocks intact
//!   by closing them at the end of a part and reopening them in the next one.
//! * [`TurnRenderer`] coalesces text streamed during one agent turn into a
//!   small number of post creations and edits ([`PostOp`]s).
//! * [`tool_use_line`] renders a one-line Markdown summary of a tool call.
//!
//! # Units
//!
//! Every size in this module is a number of Unicode scalar values (Rust
//! `char`s), which is what Mattermost counts (`utf8.RuneCountInString`) when
//! it enforces its post limit. The limit itself comes from the platform's
//! adapter ([`crate::chat::ChatOutbound::max_post_chars`]). Byte lengths are
//! never used as limits, and text is only ever cut on `char` boundaries.
//!
//! # Fenced code blocks
//!
//! Fences are recognised line by line with the `CommonMark` rules for blocks at
//! the top level of the document: an opening fence is a run of at least three
//! backticks or tildes after at most three spaces, followed by an optional info
//! string (which may not contain a backtick when the fence is made of
//! backticks); a closing fence is a run of the same character, at least as long
//! as the opening run, after at most three spaces and followed only by spaces
//! or tabs. Lines are separated by `\n`; a `\r` before it is ignored.
//!
//! Known limitations, by design:
//!
//! * Container blocks (lists, block quotes) are not interpreted, so a fence
//!   indented by four or more spaces (as inside some list items) is treated as
//!   ordinary text, exactly as `CommonMark` does at the top level.
//! * An opening fence line longer than a quarter of the size limit is treated
//!   as ordinary text, so that reopening a fence always leaves room for content.
//!
//! # Cut points and reconstruction
//!
//! A part always ends *after* the characters at its cut point: after a newline
//! for line and paragraph cuts (so the separating `"\n\n"` ends the earlier
//! part and the next part starts with the next non-blank line), after the last
//! whitespace character of a run for cuts between words, and between two
//! characters for a last-resort cut inside a word. No character of the input
//! is ever dropped or added, except these inserted fence lines:
//!
//! * when a part ends inside a fenced code block, a closing fence (the
//!   opener's character repeated as many times as in the opener) is appended:
//!   directly if the part ends with `\n`, otherwise preceded by one `\n`;
//! * the next part then starts with the opener line exactly as it appeared in
//!   the input (indentation and info string included, a trailing `\r`
//!   removed), followed by `\n`.
//!
//! Removing exactly those insertions and concatenating the parts gives back
//! the input byte for byte (for [`split_message`]; see [`TurnRenderer`] for
//! the one whitespace exception when streaming).

use std::time::{Duration, Instant};

use serde_json::Value;

/// Smallest size limit honoured by [`split_message`] and [`TurnRenderer`], in
/// Unicode scalar values. Smaller limits are raised to this value so that a
/// closing fence, a reopened fence and some content always fit in one part.
pub const MIN_SPLIT_CHARS: usize = 64;

/// Maximum length, in Unicode scalar values, of the argument shown by
/// [`tool_use_line`] (including the trailing `…` when it is shortened).
pub const TOOL_ARG_MAX_CHARS: usize = 120;

/// Maximum length, in Unicode scalar values, of the tool name shown by
/// [`tool_use_line`].
const TOOL_NAME_MAX_CHARS: usize = 64;

/// A cut at a code-block boundary is preferred when it keeps at least this
/// percentage of the window in the part.
const CODE_BOUNDARY_MIN_FILL: usize = 70;
/// A cut at a paragraph boundary is preferred when it keeps at least this
/// percentage of the window in the part.
const PARAGRAPH_MIN_FILL: usize = 50;
/// A cut at a line boundary is preferred over cuts inside a line when it
/// keeps at least this percentage of the window in the part.
const LINE_MIN_FILL: usize = 30;
/// A cut between words is preferred over a cut inside a word when it keeps
/// at least this percentage of the window in the part.
const WORD_MIN_FILL: usize = 30;

/// Below this percentage of the window, a cut that keeps the rendering
/// intact loses to one that does not (pathological input only).
const FALLBACK_MIN_FILL: usize = 10;

/// U+200D, glues emoji sequences together.
const ZERO_WIDTH_JOINER: char = '\u{200D}';

// ---------------------------------------------------------------------------
// Fence recognition
// ---------------------------------------------------------------------------

/// An open fenced code block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fence {
    /// The fence character: a backtick or a tilde.
    ch: char,
    /// Length of the opening run (ASCII, so bytes == chars).
    len: usize,
    /// The opening line, without its line terminator.
    opener: String,
    /// `opener.chars().count()`.
    opener_chars: usize,
}

impl Fence {
    /// Chars needed to reopen this fence at the start of a part.
    fn reopen_chars(&self) -> usize {
        self.opener_chars.saturating_add(1)
    }

    /// Chars needed to close this fence at the end of a part.
    fn close_chars(&self, after_newline: bool) -> usize {
        self.len.saturating_add(usize::from(!after_newline))
    }

    /// Appends the reopening line (opener plus `\n`).
    fn push_reopen(&self, out: &mut String) {
        out.push_str(&self.opener);
        out.push('\n');
    }

    /// Appends the closing run, on a new line unless `after_newline`.
    fn push_close(&self, out: &mut String, after_newline: bool) {
        if !after_newline {
            out.push('\n');
        }
        out.extend(std::iter::repeat_n(self.ch, self.len));
    }
}

/// Byte length of the indentation allowed before a fence (0–3 spaces), or
/// `None` when the line is indented further (or with a tab).
fn fence_indent(line: &str) -> Option<usize> {
    let mut spaces = 0;
    for c in line.chars() {
        match c {
            ' ' if spaces < 3 => spaces += 1,
            ' ' | '\t' => return None,
            _ => break,
        }
    }
    Some(spaces)
}

/// Splits a leading run of backticks or tildes off `s`: (char, run length,
/// rest).
fn fence_run(s: &str) -> Option<(char, usize, &str)> {
    let ch = s.chars().next()?;
    if ch != '`' && ch != '~' {
        return None;
    }
    let run = s.chars().take_while(|&c| c == ch).count();
    Some((ch, run, s.get(run..).unwrap_or("")))
}

/// Parses an opening fence line (without its `\n`). Lines longer than `cap`
/// chars are not treated as openers.
fn parse_opener(line: &str, cap: usize) -> Option<Fence> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let indent = fence_indent(line)?;
    let (ch, len, info) = fence_run(line.get(indent..)?)?;
    if len < 3 || (ch == '`' && info.contains('`')) {
        return None;
    }
    let opener_chars = line.chars().count();
    if opener_chars > cap {
        return None;
    }
    Some(Fence {
        ch,
        len,
        opener: line.to_owned(),
        opener_chars,
    })
}

/// Whether `line` (without its `\n`) closes `fence`.
fn is_closer(line: &str, fence: &Fence) -> bool {
    let Some(indent) = fence_indent(line) else {
        return false;
    };
    let Some((ch, run, rest)) = line.get(indent..).and_then(fence_run) else {
        return false;
    };
    ch == fence.ch && run >= fence.len && rest.chars().all(|c| matches!(c, ' ' | '\t' | '\r'))
}

/// Conservative test: does `s`, read from the start of a line, begin like a
/// fence line (at most three spaces, then three backticks or tildes)? When
/// `partial` is true, `s` may still grow, and a prefix that could become such
/// a start also counts. Looks at no more than the first seven chars.
fn fence_like(s: &str, partial: bool) -> bool {
    let mut spaces = 0;
    let mut run: Option<(char, usize)> = None;
    for c in s.chars() {
        match run {
            None => match c {
                ' ' if spaces < 3 => spaces += 1,
                '`' | '~' => run = Some((c, 1)),
                _ => return false,
            },
            Some((ch, n)) => {
                if c != ch {
                    return false;
                }
                if n + 1 >= 3 {
                    return true;
                }
                run = Some((ch, n + 1));
            }
        }
    }
    partial
}

/// Whether `line` is an ATX heading (`#` to `######` after at most three
/// spaces, followed by whitespace or nothing).
fn is_heading(line: &str) -> bool {
    let Some(indent) = fence_indent(line) else {
        return false;
    };
    let rest = line.get(indent..).unwrap_or("");
    let hashes = rest.chars().take_while(|&c| c == '#').count();
    (1..=6).contains(&hashes)
        && rest
            .get(hashes..)
            .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '\r']))
}

/// Whether `s`, moved to the start of a line, might start a Markdown block
/// other than a paragraph (heading, quote, list item, rule, table row).
/// Conservative: only the first characters are looked at.
fn starts_like_block(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some('#' | '>' | '-' | '*' | '+' | '=' | '_' | '|') => true,
        Some('0'..='9') => chars
            .find(|c| !c.is_ascii_digit())
            .is_some_and(|c| c == '.' || c == ')'),
        _ => false,
    }
}

/// Characters that must stay attached to the character before them
/// (combining marks, variation selectors, joiners, emoji modifiers, tags).
fn joins_previous(c: char) -> bool {
    matches!(
        c,
        '\u{0300}'..='\u{036F}'
            | '\u{1AB0}'..='\u{1AFF}'
            | '\u{1DC0}'..='\u{1DFF}'
            | '\u{200C}'..='\u{200D}'
            | '\u{20D0}'..='\u{20FF}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FE20}'..='\u{FE2F}'
            | '\u{1F3FB}'..='\u{1F3FF}'
            | '\u{E0020}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
}

// ---------------------------------------------------------------------------
// Line table
// ---------------------------------------------------------------------------

/// Role of a line in fenced-code structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// Neither opens nor closes a fence (or is not finished yet).
    Plain,
    /// Opens a fence.
    Opener,
    /// Closes the open fence.
    Closer,
}

/// One line of a scanned text.
#[derive(Debug, Clone)]
struct Line {
    /// Byte offset of the first char.
    start: usize,
    /// Byte offset just before the `\n` (or the end of the text).
    end: usize,
    /// Byte offset of the next line.
    next: usize,
    /// Index into `Scan::fences` of the fence open before this line.
    before: Option<usize>,
    /// Index into `Scan::fences` of the fence open after this line.
    after: Option<usize>,
    /// Role of the line.
    kind: LineKind,
    /// The line is known to be complete (ends with `\n` or the text is final).
    finished: bool,
    /// The line changes (or, if unfinished, might change) the fence state.
    volatile: bool,
    /// The line is empty or whitespace only.
    blank: bool,
    /// The last non-blank line up to and including this one is an ATX
    /// heading outside code (a cut after this line would orphan it).
    after_heading: bool,
}

/// Lines of a text with the fence state before and after each.
#[derive(Debug)]
struct Scan<'a> {
    /// The scanned text.
    text: &'a str,
    /// Its lines, in order.
    lines: Vec<Line>,
    /// Fences referenced by index from `lines`.
    fences: Vec<Fence>,
    /// The text is final: its last line is complete even without `\n`.
    complete: bool,
}

impl Scan<'_> {
    /// The fence with index `idx`, if any.
    fn fence(&self, idx: Option<usize>) -> Option<&Fence> {
        idx.and_then(|i| self.fences.get(i))
    }

    /// Chars needed to close the fence `idx` (0 when none is open).
    fn close_chars(&self, idx: Option<usize>, after_newline: bool) -> usize {
        self.fence(idx).map_or(0, |f| f.close_chars(after_newline))
    }
}

/// Builds the line table of `text`, which starts at a line start inside
/// `initial` (if any). `cap` is the longest opener line recognised.
fn scan<'a>(text: &'a str, initial: Option<&Fence>, cap: usize, complete: bool) -> Scan<'a> {
    let mut fences = Vec::new();
    let mut state = initial.map(|f| {
        fences.push(f.clone());
        0
    });
    let mut lines: Vec<Line> = Vec::new();
    let mut pos = 0;
    for segment in text.split_inclusive('\n') {
        let start = pos;
        pos += segment.len();
        let body = segment.strip_suffix('\n').unwrap_or(segment);
        let finished = segment.ends_with('\n') || complete;
        let before = state;
        let mut kind = LineKind::Plain;
        if finished {
            match state.and_then(|i| fences.get(i)) {
                Some(open) => {
                    if is_closer(body, open) {
                        kind = LineKind::Closer;
                        state = None;
                    }
                }
                None => {
                    if let Some(fence) = parse_opener(body, cap) {
                        fences.push(fence);
                        state = Some(fences.len() - 1);
                        kind = LineKind::Opener;
                    }
                }
            }
        }
        let volatile = if finished {
            kind != LineKind::Plain
        } else {
            fence_like(body, true)
        };
        let blank = body.trim().is_empty();
        let after_heading = if blank {
            lines.last().is_some_and(|l| l.after_heading)
        } else {
            before.is_none() && kind == LineKind::Plain && is_heading(body)
        };
        lines.push(Line {
            start,
            end: start + body.len(),
            next: pos,
            before,
            after: state,
            kind,
            finished,
            volatile,
            blank,
            after_heading,
        });
    }
    Scan {
        text,
        lines,
        fences,
        complete,
    }
}

// ---------------------------------------------------------------------------
// Choosing a cut
// ---------------------------------------------------------------------------

/// A chosen cut: the part's content ends at byte `end`.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// Byte offset just after the part's last content char.
    end: usize,
    /// Fence open at the cut (closed at the end of the part, reopened after).
    fence: Option<usize>,
    /// The content ends with `\n`.
    ends_with_newline: bool,
    /// Chars of content.
    fill: usize,
}

/// Constraints for [`choose_cut`].
#[derive(Debug, Clone, Copy)]
struct CutParams {
    /// Maximum chars of content plus inserted closing fence.
    limit: usize,
    /// Chars the fill thresholds are relative to.
    window: usize,
    /// Allow cuts that may alter how the text around the cut renders.
    allow_fallback: bool,
    /// Cuts before this byte offset are not considered.
    min_end: usize,
}

/// Best candidate so far in each preference tier (latest wins in a tier).
#[derive(Debug, Default)]
struct Tiers {
    /// Code-block or paragraph boundary far enough into the window.
    clean: Option<Cut>,
    /// Line boundary far enough into the window.
    line: Option<Cut>,
    /// Between words, far enough into the window.
    word: Option<Cut>,
    /// Any cut that keeps the rendering of the text around it unchanged.
    safe: Option<Cut>,
    /// Any cut that keeps the part itself well-formed.
    head_safe: Option<Cut>,
    /// Any cut at all.
    any: Option<Cut>,
}

/// `fill` is at least `percent`% of `window`.
fn reaches(fill: usize, window: usize, percent: usize) -> bool {
    fill.saturating_mul(100) >= window.saturating_mul(percent)
}

/// Chooses where the part starting at byte `start` should end. Returns `None`
/// only when no position fits (or, without fallback, no safe one does).
fn choose_cut(scan: &Scan<'_>, start: usize, params: CutParams) -> Option<Cut> {
    let text = scan.text;
    let rest = text.get(start..)?;
    let mut li = scan.lines.partition_point(|l| l.next <= start);
    let mut tiers = Tiers::default();
    let mut end_cut: Option<Cut> = None;
    let mut fill = 0usize;
    let mut chars = rest.char_indices().peekable();
    while let Some((offset, c)) = chars.next() {
        fill += 1;
        if fill > params.limit {
            break;
        }
        let Some(line) = scan.lines.get(li) else {
            break;
        };
        let next = chars.peek().map(|&(_, n)| n);
        let p = start + offset + c.len_utf8();
        let at_end = p == text.len();
        let eligible = p >= params.min_end;
        if c == '\n' {
            let fence = line.after;
            if eligible && fill + scan.close_chars(fence, true) <= params.limit {
                let cut = Cut {
                    end: p,
                    fence,
                    ends_with_newline: true,
                    fill,
                };
                let block = line.kind == LineKind::Closer
                    || scan
                        .lines
                        .get(li + 1)
                        .is_some_and(|n| n.kind == LineKind::Opener);
                let paragraph = line.blank && line.before.is_none() && line.after.is_none();
                if !line.after_heading
                    && ((block && reaches(fill, params.window, CODE_BOUNDARY_MIN_FILL))
                        || (paragraph && reaches(fill, params.window, PARAGRAPH_MIN_FILL)))
                {
                    tiers.clean = Some(cut);
                }
                if reaches(fill, params.window, LINE_MIN_FILL) {
                    tiers.line = Some(cut);
                }
                tiers.safe = Some(cut);
                tiers.head_safe = Some(cut);
                tiers.any = Some(cut);
                if at_end {
                    end_cut = Some(cut);
                }
            }
            li += 1;
            continue;
        }
        let fence = line.before;
        if !eligible || fill + scan.close_chars(fence, false) > params.limit {
            continue;
        }
        let cut = Cut {
            end: p,
            fence,
            ends_with_newline: false,
            fill,
        };
        tiers.any = Some(cut);
        let head = text.get(line.start.max(start)..p).unwrap_or("");
        if fence_like(head, false) {
            continue;
        }
        tiers.head_safe = Some(cut);
        let glued = c == ZERO_WIDTH_JOINER || c == '\r' || next.is_some_and(joins_previous);
        if glued || line.volatile || next == Some('\r') {
            continue;
        }
        let tail = text.get(p..line.end).unwrap_or("");
        let tail_ok = if tail.is_empty() {
            // Nothing follows on this line (yet): only the very end of the
            // text, and when streaming only after whitespace.
            at_end && (scan.complete || c.is_whitespace())
        } else {
            !fence_like(tail, !line.finished)
        };
        if !tail_ok {
            continue;
        }
        tiers.safe = Some(cut);
        if at_end {
            end_cut = Some(cut);
        }
        if c.is_whitespace()
            && !next.is_some_and(char::is_whitespace)
            && !starts_like_block(tail)
            && reaches(fill, params.window, WORD_MIN_FILL)
        {
            tiers.word = Some(cut);
        }
    }
    let preferred = tiers.clean.or(tiers.line).or(tiers.word);
    let chosen = if params.allow_fallback {
        // Without a good cut (only with pathological fence-like lines longer
        // than the window), a cut that may alter the rendering beats a flood
        // of tiny parts.
        let far =
            |cut: Option<Cut>| cut.filter(|c| reaches(c.fill, params.window, FALLBACK_MIN_FILL));
        preferred
            .or(far(tiers.safe))
            .or(far(tiers.head_safe))
            .or(tiers.any)
    } else {
        preferred.or(tiers.safe)
    }?;
    // Do not leave only whitespace behind when everything fits.
    if let Some(end) = end_cut {
        if end.end > chosen.end && text.get(chosen.end..).is_some_and(|r| r.trim().is_empty()) {
            return Some(end);
        }
    }
    Some(chosen)
}

// ---------------------------------------------------------------------------
// Splitting
// ---------------------------------------------------------------------------

/// Splits Markdown `text` into parts of at most `max_chars` Unicode scalar
/// values each, for posting as consecutive chat posts.
///
/// * `max_chars` is a number of `char`s (Mattermost counts runes, not bytes);
///   values below [`MIN_SPLIT_CHARS`] (64) are raised to it. Use the
///   platform's post limit for full-size posts.
/// * Empty `text` gives an empty `Vec`; a `text` of at most `max_chars` chars
///   gives one part identical to it.
/// * Cuts are chosen, in order of preference, at the end of a code block or
///   just before one starts (when that keeps at least 70% of the window), at a
///   paragraph boundary (after a blank line outside code, at least 50%), at a
///   line boundary (at least 30%), after the whitespace between two words (at
///   least 30%, and not where the next part would start like a heading, list
///   item or quote), and as a last resort inside a word; within a kind the latest
///   possible cut wins. The first two kinds are not used right after a
///   heading, so that a heading stays with its section. Cuts are always
///   between two `char`s and never inside a grapheme held together by a
///   joiner, combining mark or variation selector when another cut is
///   possible.
/// * A part that ends inside a fenced code block gets a closing fence line
///   appended, and the next part starts with the original opener line (info
///   string included); see the module documentation for the exact format and
///   the reconstruction rule: apart from those lines nothing is added or
///   dropped, so the separating whitespace stays at the end of the earlier
///   part. A part can therefore consist of whitespace only if the input has
///   very long whitespace runs; callers may skip such parts.
///
/// Never panics; runs in time linear in the length of `text`.
pub fn split_message(text: &str, max_chars: usize) -> Vec<String> {
    let max = max_chars.max(MIN_SPLIT_CHARS);
    if text.is_empty() {
        return Vec::new();
    }
    if text.chars().nth(max).is_none() {
        return vec![text.to_owned()];
    }
    let scan = scan(text, None, max / 4, true);
    let mut parts = Vec::new();
    let mut start = 0;
    let mut state: Option<usize> = None;
    while start < text.len() {
        let reopen = scan.fence(state);
        let avail = max.saturating_sub(reopen.map_or(0, Fence::reopen_chars));
        let rest = text.get(start..).unwrap_or("");
        let mut part = String::new();
        if let Some(fence) = reopen {
            fence.push_reopen(&mut part);
        }
        let params = CutParams {
            limit: avail,
            window: avail,
            allow_fallback: true,
            min_end: 0,
        };
        let cut = if rest.chars().nth(avail).is_none() {
            None
        } else {
            choose_cut(&scan, start, params).filter(|c| c.end > start)
        };
        let Some(cut) = cut else {
            part.push_str(rest);
            parts.push(part);
            break;
        };
        part.push_str(text.get(start..cut.end).unwrap_or(""));
        if let Some(fence) = scan.fence(cut.fence) {
            fence.push_close(&mut part, cut.ends_with_newline);
        }
        parts.push(part);
        start = cut.end;
        state = cut.fence;
    }
    parts
}

// ---------------------------------------------------------------------------
// Coalescing streamed output
// ---------------------------------------------------------------------------

/// Limits for [`TurnRenderer`]. All sizes are in Unicode scalar values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceConfig {
    /// Hard limit on the text of any post (the platform's post limit); raised to at least
    /// [`MIN_SPLIT_CHARS`].
    pub max_post_chars: usize,
    /// When a post's text would exceed this, the post is finished and the
    /// text continues in a new one (by default 11/12 of `max_post_chars`, so an
    /// edit can still add a closing fence). Clamped to
    /// `MIN_SPLIT_CHARS..=max_post_chars`; no post ever exceeds it.
    pub soft_limit_chars: usize,
    /// Minimum time between two sends (create or update) of the same post,
    /// except for the final update of a post (default 1 s).
    pub min_edit_interval: Duration,
    /// Maximum number of updates of one post (default 30); the last one
    /// finishes the post and later text goes to a new post. Raised to at
    /// least 1.
    pub max_edits_per_post: u32,
}

impl CoalesceConfig {
    /// The defaults for a platform whose posts hold at most `max_post_chars`.
    pub fn for_post_limit(max_post_chars: usize) -> Self {
        Self {
            max_post_chars,
            soft_limit_chars: max_post_chars / 12 * 11,
            min_edit_interval: Duration::from_secs(1),
            max_edits_per_post: 30,
        }
    }

    /// The configuration with every field brought into its valid range (see
    /// the field documentation); this is what [`TurnRenderer`] uses.
    pub fn normalized(self) -> Self {
        let max_post_chars = self.max_post_chars.max(MIN_SPLIT_CHARS);
        Self {
            max_post_chars,
            soft_limit_chars: self.soft_limit_chars.clamp(MIN_SPLIT_CHARS, max_post_chars),
            min_edit_interval: self.min_edit_interval,
            max_edits_per_post: self.max_edits_per_post.max(1),
        }
    }
}

/// A chat operation decided by [`TurnRenderer`].
///
/// `slot` is the index of the post within the turn (0, 1, 2, …). For every
/// slot exactly one `Create` is emitted, before any `Update` of that slot, and
/// slots are created in increasing order without gaps; once slot `n + 1` is
/// created, slot `n` receives no further operations. The caller maps slots to
/// real post ids. `text` is always the full message of the post (never a
/// delta), is never empty or whitespace only, and has at most
/// `soft_limit_chars` chars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOp {
    /// Create the post for `slot` with this message.
    Create {
        /// Index of the post within the turn.
        slot: usize,
        /// Full message.
        text: String,
    },
    /// Replace the message of the post created for `slot`.
    Update {
        /// Index of the post within the turn.
        slot: usize,
        /// Full message.
        text: String,
    },
}

impl PostOp {
    /// The slot this operation applies to.
    pub fn slot(&self) -> usize {
        match self {
            PostOp::Create { slot, .. } | PostOp::Update { slot, .. } => *slot,
        }
    }

    /// The full message carried by this operation.
    pub fn text(&self) -> &str {
        match self {
            PostOp::Create { text, .. } | PostOp::Update { text, .. } => text,
        }
    }
}

/// A cut of the current slot planned by [`TurnRenderer`].
#[derive(Debug)]
struct PlannedCut {
    /// Byte offset in the buffer where the slot's content ends.
    end: usize,
    /// Fence open at the cut.
    next_fence: Option<Fence>,
    /// Final text of the slot.
    text: String,
}

/// Pure state machine turning the text streamed during one agent turn into
/// post creations and edits.
///
/// Time is supplied by the caller as [`Instant`]s; the renderer never reads a
/// clock. Usage: call [`push`](Self::push) with each piece of text, perform
/// the returned operations in order, call [`poll`](Self::poll) when
/// [`next_deadline`](Self::next_deadline) passes, and call
/// [`finish`](Self::finish) once at the end of the turn.
///
/// Behaviour:
///
/// * The first text containing a non-whitespace character is posted at once
///   (`Create`); whitespace before it is kept and posted with it.
/// * A created post is then updated at most once per `min_edit_interval`
///   (measured from its last create or update); text arriving sooner waits
///   for `poll` or `finish`. No update repeats the post's current text.
/// * When a post's text would exceed `soft_limit_chars`, or it is due for its
///   `max_edits_per_post`-th update, it is finished with a final update (which
///   ignores the interval) and the text continues in the next slot, which is
///   created at once if it has non-whitespace content. The cut follows the
///   rules of [`split_message`], including closing an open code fence at the
///   end of the finished post and reopening it in the next one. A single large
///   push can finish several posts at once.
/// * Reconstruction: removing the inserted fence lines from the final text of
///   every slot and concatenating them gives back all pushed text, except
///   that whitespace-only text which would have to form a post of its own
///   (Mattermost rejects empty messages) is never posted: at the end of the
///   turn, or, in pathological cases, a whole oversized run of whitespace.
/// * Streaming text may temporarily end inside an open code block; the final
///   post of the turn closes fences exactly as the agent's text does.
#[derive(Debug, Clone)]
pub struct TurnRenderer {
    /// Normalised configuration.
    cfg: CoalesceConfig,
    /// Longest opener line recognised as a fence.
    fence_cap: usize,
    /// Index of the current slot.
    slot: usize,
    /// Fence open at the start of the current slot (reopened in its text).
    fence: Option<Fence>,
    /// Pushed text belonging to the current slot.
    buf: String,
    /// `buf.chars().count()`.
    buf_chars: usize,
    /// `buf` contains a non-whitespace char.
    has_ink: bool,
    /// `buf` changed since the current slot was last sent.
    dirty: bool,
    /// The current slot has been created.
    created: bool,
    /// Text last sent for the current slot.
    shown: String,
    /// Updates sent for the current slot.
    edits: u32,
    /// Time of the last create or update of the current slot.
    last_sent: Option<Instant>,
    /// A max-edits rollover found no safe cut; wait for more text or finish.
    stalled: bool,
}

impl TurnRenderer {
    /// A renderer for one turn; `cfg` is normalised with
    /// [`CoalesceConfig::normalized`].
    pub fn new(cfg: CoalesceConfig) -> Self {
        let cfg = cfg.normalized();
        Self {
            fence_cap: cfg.soft_limit_chars / 4,
            cfg,
            slot: 0,
            fence: None,
            buf: String::new(),
            buf_chars: 0,
            has_ink: false,
            dirty: false,
            created: false,
            shown: String::new(),
            edits: 0,
            last_sent: None,
            stalled: false,
        }
    }

    /// The effective (normalised) configuration.
    pub fn config(&self) -> CoalesceConfig {
        self.cfg
    }

    /// Adds text from the agent received at `now` and returns the operations
    /// to perform now, in order. When none are returned while text is
    /// pending, call [`poll`](Self::poll) at [`next_deadline`](Self::next_deadline).
    pub fn push(&mut self, text: &str, now: Instant) -> Vec<PostOp> {
        let mut ops = Vec::new();
        if !text.is_empty() {
            self.buf.push_str(text);
            self.buf_chars = self.buf_chars.saturating_add(text.chars().count());
            self.has_ink |= has_ink(text);
            self.dirty = true;
            self.stalled = false;
            self.roll_oversized(&mut ops);
        }
        self.flush(now, false, &mut ops);
        ops
    }

    /// Flushes pending text if the current post's edit interval has elapsed
    /// at `now`; returns the operations to perform (possibly none).
    pub fn poll(&mut self, now: Instant) -> Vec<PostOp> {
        let mut ops = Vec::new();
        self.flush(now, false, &mut ops);
        ops
    }

    /// When [`poll`](Self::poll) should next be called, or `None` when
    /// nothing is waiting for time to pass (no pending text, text waiting for
    /// its first non-whitespace char, or — after a rollover that found no safe
    /// cut — text waiting for more text). The deadline may already be past;
    /// polling at or after it always makes progress.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.dirty && self.created && !self.stalled {
            self.last_sent
                .and_then(|t| t.checked_add(self.cfg.min_edit_interval))
        } else {
            None
        }
    }

    /// Ends the turn at `now`: flushes all pending text, ignoring the edit
    /// interval (and the edit budget, which always has one edit left for
    /// this). Calling it again emits nothing new; text pushed after it would
    /// continue the last post.
    pub fn finish(&mut self, now: Instant) -> Vec<PostOp> {
        let mut ops = Vec::new();
        self.stalled = false;
        self.roll_oversized(&mut ops);
        self.flush(now, true, &mut ops);
        ops
    }

    /// Chars of the reopening line at the start of the current slot.
    fn prefix_chars(&self) -> usize {
        self.fence.as_ref().map_or(0, Fence::reopen_chars)
    }

    /// Full text of the current slot as it stands.
    fn current_text(&self) -> String {
        let mut text = String::with_capacity(self.buf.len() + 16);
        if let Some(fence) = &self.fence {
            fence.push_reopen(&mut text);
        }
        text.push_str(&self.buf);
        text
    }

    /// The current slot may be sent again at `now`.
    fn interval_elapsed(&self, now: Instant) -> bool {
        self.last_sent
            .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.min_edit_interval)
    }

    /// Finishes posts while the current one is over the soft limit.
    fn roll_oversized(&mut self, ops: &mut Vec<PostOp>) {
        while self.prefix_chars().saturating_add(self.buf_chars) > self.cfg.soft_limit_chars {
            let limit = self
                .cfg
                .soft_limit_chars
                .saturating_sub(self.prefix_chars());
            let params = CutParams {
                limit,
                window: limit,
                allow_fallback: true,
                min_end: self.min_cut_end(),
            };
            // Keeping some of the post's visible text in it is preferred, but
            // staying under the limit is mandatory.
            let planned = self.plan_cut(params).or_else(|| {
                self.plan_cut(CutParams {
                    min_end: 0,
                    ..params
                })
            });
            let Some(cut) = planned else {
                break;
            };
            self.finish_slot(cut, ops);
        }
    }

    /// Sends pending text if allowed.
    fn flush(&mut self, now: Instant, force: bool, ops: &mut Vec<PostOp>) {
        if !self.dirty {
            return;
        }
        if !self.created {
            if self.has_ink {
                let text = self.current_text();
                ops.push(PostOp::Create {
                    slot: self.slot,
                    text: text.clone(),
                });
                self.shown = text;
                self.created = true;
                self.last_sent = Some(now);
                self.dirty = false;
            }
            return;
        }
        if !force {
            if self.stalled || !self.interval_elapsed(now) {
                return;
            }
            if self.edits.saturating_add(1) >= self.cfg.max_edits_per_post {
                self.roll_for_edits(now, ops);
                return;
            }
        }
        let text = self.current_text();
        if text != self.shown {
            ops.push(PostOp::Update {
                slot: self.slot,
                text: text.clone(),
            });
            self.edits = self.edits.saturating_add(1);
            self.shown = text;
            self.last_sent = Some(now);
        }
        self.dirty = false;
    }

    /// The current post is due for its last allowed update: finish it at a
    /// good cut and continue in the next slot.
    fn roll_for_edits(&mut self, now: Instant, ops: &mut Vec<PostOp>) {
        let params = CutParams {
            limit: self
                .cfg
                .soft_limit_chars
                .saturating_sub(self.prefix_chars()),
            window: self.buf_chars.max(1),
            allow_fallback: false,
            min_end: self.min_cut_end(),
        };
        match self.plan_cut(params) {
            Some(cut) => {
                self.finish_slot(cut, ops);
                self.flush(now, false, ops);
            }
            None => self.stalled = true,
        }
    }

    /// For a created post, the smallest cut that keeps a non-whitespace char
    /// in it (its final text must not be blank); 0 otherwise.
    fn min_cut_end(&self) -> usize {
        if !self.created {
            return 0;
        }
        self.buf
            .char_indices()
            .find(|&(_, c)| !c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8())
    }

    /// Chooses where the current slot ends and builds its final text.
    fn plan_cut(&self, params: CutParams) -> Option<PlannedCut> {
        let scan = scan(&self.buf, self.fence.as_ref(), self.fence_cap, false);
        let cut = choose_cut(&scan, 0, params).filter(|c| c.end > 0)?;
        let next_fence = scan.fence(cut.fence).cloned();
        let mut text = String::new();
        if let Some(fence) = &self.fence {
            fence.push_reopen(&mut text);
        }
        text.push_str(self.buf.get(..cut.end)?);
        if let Some(fence) = &next_fence {
            fence.push_close(&mut text, cut.ends_with_newline);
        }
        Some(PlannedCut {
            end: cut.end,
            next_fence,
            text,
        })
    }

    /// Emits the final operation of the current slot and starts the next one
    /// with the text after the cut.
    fn finish_slot(&mut self, cut: PlannedCut, ops: &mut Vec<PostOp>) {
        let content = self.buf.get(..cut.end).unwrap_or("");
        if self.created {
            // A blank final text is never sent; the post keeps its last text
            // (only possible for pathological whitespace runs).
            if cut.text != self.shown && has_ink(content) {
                ops.push(PostOp::Update {
                    slot: self.slot,
                    text: cut.text,
                });
            }
            self.slot += 1;
        } else if has_ink(content) {
            ops.push(PostOp::Create {
                slot: self.slot,
                text: cut.text,
            });
            self.slot += 1;
        }
        // Otherwise the slot was never created and has nothing to show: its
        // whitespace is dropped and the slot index is reused.
        self.buf = self.buf.get(cut.end..).unwrap_or("").to_owned();
        self.buf_chars = self.buf.chars().count();
        self.has_ink = has_ink(&self.buf);
        self.dirty = !self.buf.is_empty();
        self.fence = cut.next_fence;
        self.created = false;
        self.shown.clear();
        self.edits = 0;
        self.last_sent = None;
        self.stalled = false;
    }
}

/// `text` contains a non-whitespace char.
fn has_ink(text: &str) -> bool {
    text.chars().any(|c| !c.is_whitespace())
}

// ---------------------------------------------------------------------------
// Tool-use lines
// ---------------------------------------------------------------------------

/// One-line Markdown summary of a Claude Code tool call, shown instead of the
/// raw JSON input.
///
/// Format: `🔧 ` followed by the tool name as a code span and, when the input
/// has something worth showing, a space and a summary:
///
/// | tool | summary |
/// |------|---------|
/// | `Bash` | `` `$ <command>` `` |
/// | `Read`, `Write`, `Edit`, `MultiEdit`, `NotebookEdit`, `NotebookRead`, `LS` | `file_path` (or `notebook_path`, `path`) |
/// | `Glob`, `Grep` | `pattern`, then ` in ` and `path` if present |
/// | `WebFetch` / `WebSearch` | `url` / `query` |
/// | `Task`, `Agent` | `description` (or `prompt`) |
/// | `TodoWrite` | `N todos` (`1 todo`) |
/// | anything else | the first short string field of the input (in the map's iteration order), else the first non-empty one |
///
/// A tool whose expected field is missing falls back to the last row; an
/// empty or non-object input (the CLI first sends `{}`) gives just the name
/// (a plain string input is shown itself).
///
/// Every shown value is reduced to its first non-blank line, with control
/// characters replaced by spaces, trimmed, and shortened to at most
/// [`TOOL_ARG_MAX_CHARS`] chars ending in `…` (an `…` is also added when
/// lines were left out); the Bash `$ ` comes on top. Values are put in code
/// spans whose backtick fence is longer than any backtick run inside, so the
/// Markdown cannot break. The result never contains a newline, and the
/// function never panics.
pub fn tool_use_line(name: &str, input: &Value) -> String {
    let shown_name = summarize(name, TOOL_NAME_MAX_CHARS);
    let mut line = String::from("🔧 ");
    if shown_name.is_empty() {
        line.push_str("tool");
    } else {
        line.push_str(&code_span(&shown_name));
    }
    if let Some(detail) = tool_detail(name.trim(), input) {
        line.push(' ');
        line.push_str(&detail);
    }
    line
}

/// Markdown summary of the input of tool `name`, if there is one.
fn tool_detail(name: &str, input: &Value) -> Option<String> {
    let specific = match name {
        "Bash" => first_field(input, &["command"]).map(|cmd| code_span(&format!("$ {cmd}"))),
        "Read" | "Write" | "Edit" | "MultiEdit" | "NotebookEdit" | "NotebookRead" | "LS" => {
            field_span(input, &["file_path", "notebook_path", "path"])
        }
        "Glob" | "Grep" => {
            field_span(input, &["pattern"]).map(|pattern| match field_span(input, &["path"]) {
                Some(path) => format!("{pattern} in {path}"),
                None => pattern,
            })
        }
        "WebFetch" => field_span(input, &["url"]),
        "WebSearch" => field_span(input, &["query"]),
        "Task" | "Agent" => field_span(input, &["description", "prompt"]),
        "TodoWrite" => {
            input
                .get("todos")
                .and_then(Value::as_array)
                .map(|todos| match todos.len() {
                    1 => "1 todo".to_owned(),
                    n => format!("{n} todos"),
                })
        }
        _ => None,
    };
    specific.or_else(|| generic_detail(input))
}

/// Summary of the first of `keys` holding a non-blank string.
fn first_field(input: &Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|key| {
        input
            .get(key)
            .and_then(Value::as_str)
            .map(|s| summarize(s, TOOL_ARG_MAX_CHARS))
            .filter(|s| !s.is_empty())
    })
}

/// [`first_field`] as a code span.
fn field_span(input: &Value, keys: &[&str]) -> Option<String> {
    first_field(input, keys).map(|s| code_span(&s))
}

/// Summary for tools without a dedicated rule (see [`tool_use_line`]).
fn generic_detail(input: &Value) -> Option<String> {
    let chosen = match input {
        Value::String(s) => s.as_str(),
        Value::Object(map) => {
            let mut strings = map
                .values()
                .filter_map(Value::as_str)
                .filter(|s| !s.trim().is_empty());
            let first = strings.clone().next()?;
            strings
                .find(|s| !s.contains('\n') && s.chars().nth(TOOL_ARG_MAX_CHARS).is_none())
                .unwrap_or(first)
        }
        _ => return None,
    };
    let summary = summarize(chosen, TOOL_ARG_MAX_CHARS);
    (!summary.is_empty()).then(|| code_span(&summary))
}

/// First non-blank line of `s`, control chars replaced by spaces, trimmed,
/// at most `max_chars` chars (ending in `…` when shortened or when more
/// non-blank lines follow).
fn summarize(s: &str, max_chars: usize) -> String {
    let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.next() else {
        return String::new();
    };
    let more = lines.next().is_some();
    let long = first.chars().nth(max_chars).is_some();
    let keep = if long {
        max_chars.saturating_sub(1)
    } else {
        max_chars
    };
    let cleaned: String = first
        .chars()
        .take(keep)
        .map(|c| {
            if c.is_control() || (c.is_whitespace() && c != ' ') {
                ' '
            } else {
                c
            }
        })
        .collect();
    let mut out = cleaned.trim().to_owned();
    if long || more {
        if more && !long && out.chars().count() >= max_chars {
            out = out
                .chars()
                .take(max_chars.saturating_sub(1))
                .collect::<String>()
                .trim_end()
                .to_owned();
        }
        out.push('…');
    }
    out
}

/// `s` as a Markdown code span whose backtick fence is longer than any run of
/// backticks in `s` (padded with spaces when `s` starts or ends with one).
fn code_span(s: &str) -> String {
    let mut longest = 0usize;
    let mut run = 0usize;
    for c in s.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let fence = "`".repeat(longest + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{s}{pad}{fence}")
}

// ---------------------------------------------------------------------------
// Making agent text inert
// ---------------------------------------------------------------------------

/// U+2060 WORD JOINER: invisible, and breaks a mention's `@name` for the chat server.
const WORD_JOINER: char = '\u{2060}';

/// Makes agent text inert before it is posted: outside fenced code blocks and inline code
/// spans (where nothing is rendered anyway, and code must stay exact),
///
/// * every mention (`@here`, `@channel`, `@all`, `@someone`) gets a word joiner after its `@`,
///   so the chat server notifies nobody: agent text, which prompt injection can steer, must not
///   reach past its thread;
/// * every image (`![alt](url)`, `![alt][ref]`) becomes a plain link: a chat server or client
///   fetches an image preview from outside the firewall, which would be a path around the
///   egress control.
///
/// The result is the input but for those insertions and removals; applying it twice changes
/// nothing more.
pub fn neutralize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut fence: Option<Fence> = None;
    for line in text.split_inclusive('\n') {
        let content = line.strip_suffix('\n').unwrap_or(line);
        match &fence {
            Some(open) => {
                if is_closer(content, open) {
                    fence = None;
                }
                out.push_str(line);
            }
            None => {
                if let Some(open) = parse_opener(content, usize::MAX) {
                    fence = Some(open);
                    out.push_str(line);
                } else {
                    neutralize_line(line, &mut out);
                }
            }
        }
    }
    out
}

/// One line outside fenced code: mentions and images made inert, inline code spans kept.
fn neutralize_line(line: &str, out: &mut String) {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '`' {
            // An inline code span: a run of n backticks up to the next run of exactly n.
            let run = chars[i..].iter().take_while(|&&b| b == '`').count();
            let close = (i + run..chars.len()).find(|&j| {
                chars[j] == '`'
                    && chars[j..].iter().take_while(|&&b| b == '`').count() == run
                    && (j == 0 || chars[j - 1] != '`')
            });
            let end = close.map_or(i + run, |j| j + run);
            out.extend(&chars[i..end]);
            i = end;
            continue;
        }
        let at_word_start = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '@' && at_word_start && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric()) {
            out.push('@');
            out.push(WORD_JOINER);
            i += 1;
            continue;
        }
        if c == '!' && chars.get(i + 1) == Some(&'[') {
            i += 1; // `![alt](url)` → `[alt](url)`
            continue;
        }
        out.push(c);
        i += 1;
    }
}
