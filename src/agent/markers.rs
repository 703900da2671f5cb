//! Incremental, line-anchored, fence-aware scanner for the control markers an
//! agent prints into its text output.
//!
//! The agent's text reaches us in chunks that may be split anywhere: in the
//! middle of a line, of a marker, or of a `\r\n` pair (chunks are `&str`, so
//! a split never falls inside a character).
//! [`MarkerScanner`] turns those chunks into a stream of [`ScanEvent`]s: plain
//! [`ScanEvent::Text`] to forward to the chat thread and
//! [`ScanEvent::Marker`] for control markers.
//!
//! # Marker grammar
//!
//! A *line* is the text up to and including `\n`; a `\r` directly before the
//! `\n` is ignored for recognition (it is never part of a value). A lone `\r`
//! does not end a line.
//!
//! A line is a marker line only if **all** of the following hold:
//!
//! * it starts with `[` at column 0 (no leading whitespace);
//! * it is outside a fenced code block (see below);
//! * `[` is immediately followed by a marker name of the active
//!   [`MarkerSet`], spelled exactly (upper case), and the name is followed by
//!   `:`, `]`, whitespace or the end of the line — so `[NETWORK_REQUESTED: x]`
//!   and `[see below]` are plain text;
//! * it is at most [`MAX_MARKER_LINE_BYTES`] bytes long (excluding the `\n`;
//!   a `CREATE_*` line only needs its `[NAME: value]` head to fit).
//!
//! Such a line is either a well-formed marker or [`Marker::Malformed`]:
//!
//! | form | event |
//! | --- | --- |
//! | `[NETWORK_REQUEST: host]` | [`Marker::NetworkRequest`] |
//! | `[CREATE_SESSION: target] task…` | [`Marker::CreateSession`] |
//! | `[CREATE_REVIEWER: target] task…` | [`Marker::CreateReviewer`] |
//! | `[SESSION_STATUS]` | [`Marker::SessionStatus`] |
//! | `[STOP_SESSION: prefix]` | [`Marker::StopSession`] |
//!
//! For the valued forms the name must be followed directly by `:`; the value
//! is everything up to the first `]`, trimmed. It must not be empty and must
//! not contain `[`. After the closing `]`, `NETWORK_REQUEST`,
//! `SESSION_STATUS` and `STOP_SESSION` allow only whitespace. Values are not
//! validated any further here (e.g. `NETWORK_REQUEST` values go through
//! `firewall::domain::parse_domain`, session targets and id prefixes through
//! their own parsers).
//!
//! # Tasks (`CREATE_SESSION` / `CREATE_REVIEWER`)
//!
//! The task is the text after `]` on the marker line plus the following
//! lines up to, not including, the first blank line (empty or whitespace
//! only) or the end of the stream ([`MarkerScanner::finish`]). Task lines are
//! consumed (not emitted as text); the blank line that ends a task is emitted
//! as text. Lines are joined with `\n` (trailing `\r` removed) and the whole
//! task is trimmed; it may be empty. Inside a task nothing is interpreted: a
//! marker-looking line or a code fence is just task text. A task is capped at
//! [`MAX_TASK_BYTES`] bytes of raw input (counting line ends): the line that
//! would cross the cap is not part of the task, the task ends before it and
//! that line is scanned normally (if it is the marker line itself, the text
//! after `]` is emitted as text and the task is empty). The marker event is
//! emitted when the task ends.
//!
//! # Code fences
//!
//! `CommonMark` fenced code blocks: a line indented by at most three spaces
//! whose first non-space characters are a run of at least three backticks or
//! three tildes opens a fence (for backticks, the rest of the line must not
//! contain a backtick, as in `CommonMark`). The fence is closed by a line
//! indented by at most three spaces made of a run of the same character at
//! least as long, followed only by whitespace. Nothing inside a fence is a
//! marker. An unclosed fence stays open until [`MarkerScanner::finish`] or
//! [`MarkerScanner::reset`]. Container blocks (block quotes, list items) are
//! not modelled: a fence inside `> ` or an indented list item does not count.
//!
//! # Streaming guarantees
//!
//! * Marker lines (including their line end) and task lines are never
//!   emitted as text; every other byte is emitted as text exactly once, in
//!   order.
//! * Text is held back only while the current line could still become a
//!   marker line (it is at column 0, outside a fence, and consistent with
//!   the grammar above), or while a task is being captured. Anything else is
//!   emitted as soon as it arrives, even without its newline.
//! * For any input and any split into chunks, the events (after merging
//!   adjacent [`ScanEvent::Text`]) equal those of feeding the whole input at
//!   once; both followed by [`MarkerScanner::finish`].
//! * Memory is bounded: a held line never exceeds [`MAX_MARKER_LINE_BYTES`]
//!   (plus one chunk) and a task never exceeds [`MAX_TASK_BYTES`] (plus one
//!   chunk).

use std::mem;

/// Longest line (in bytes, without its `\n`) that can still be a marker line.
/// A held partial line that grows past this is flushed as text.
pub const MAX_MARKER_LINE_BYTES: usize = 4096;

/// Largest task (in raw input bytes, line ends included) captured for a
/// `CREATE_SESSION` / `CREATE_REVIEWER` marker.
pub const MAX_TASK_BYTES: usize = 16 * 1024;

/// One unit of scanner output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEvent {
    /// Text to forward verbatim (byte for byte) to the chat thread. Adjacent
    /// `Text` events carry no meaning of their own and may be merged.
    Text(String),
    /// A control marker recognised in the stream (possibly malformed).
    Marker(Marker),
}

/// A control marker printed by the agent on a line of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `[NETWORK_REQUEST: pypi.org]`: the agent asks for a host to be
    /// allowed through the firewall. `domain` is the raw trimmed text between
    /// `:` and `]`, not yet validated.
    NetworkRequest {
        /// Raw, trimmed, non-empty value without `[`, `]` or `\n`; may hold
        /// other control characters, so validate before use.
        domain: String,
    },
    /// `[CREATE_SESSION: org/repo@branch] task…` (orchestrator only).
    CreateSession {
        /// Raw, trimmed, non-empty value without `[`, `]` or `\n`; may hold
        /// other control characters, so validate before use.
        target: String,
        /// The task: text after `]` plus the following lines up to the
        /// first blank line, joined with `\n` and trimmed. May be empty.
        task: String,
    },
    /// `[CREATE_REVIEWER: org/repo] task…` (orchestrator only).
    CreateReviewer {
        /// Raw, trimmed, non-empty value without `[`, `]` or `\n`; may hold
        /// other control characters, so validate before use.
        target: String,
        /// Same shape as [`Marker::CreateSession::task`].
        task: String,
    },
    /// `[SESSION_STATUS]` (orchestrator only).
    SessionStatus,
    /// `[STOP_SESSION: 1a2b3c4d]` (orchestrator only).
    StopSession {
        /// Raw, trimmed, non-empty value without `[`, `]` or `\n`; may hold
        /// other control characters, so validate before use.
        id_prefix: String,
    },
    /// A line that starts like a marker of the active set (`[` + name +
    /// `:`, `]`, whitespace or end of line) but is not well-formed.
    Malformed {
        /// The whole line without its line end (`\n` or `\r\n`).
        line: String,
        /// Human-readable explanation, e.g. "empty value".
        reason: String,
    },
}

/// Which marker names a scanner recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarkerSet {
    /// A working agent: only `NETWORK_REQUEST`; every other name is text.
    Agent,
    /// The orchestrator: all markers.
    Orchestrator,
}

/// The marker names, in no particular order. No name is a prefix of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    NetworkRequest,
    CreateSession,
    CreateReviewer,
    SessionStatus,
    StopSession,
}

impl Name {
    const ALL: [Name; 5] = [
        Name::NetworkRequest,
        Name::CreateSession,
        Name::CreateReviewer,
        Name::SessionStatus,
        Name::StopSession,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Name::NetworkRequest => "NETWORK_REQUEST",
            Name::CreateSession => "CREATE_SESSION",
            Name::CreateReviewer => "CREATE_REVIEWER",
            Name::SessionStatus => "SESSION_STATUS",
            Name::StopSession => "STOP_SESSION",
        }
    }

    fn in_set(self, set: MarkerSet) -> bool {
        match set {
            MarkerSet::Agent => self == Name::NetworkRequest,
            MarkerSet::Orchestrator => true,
        }
    }

    fn is_create(self) -> bool {
        matches!(self, Name::CreateSession | Name::CreateReviewer)
    }
}

/// What is known about a (possibly partial) line held at column 0.
#[derive(Debug)]
enum Verdict {
    /// Not a marker line, and no continuation can make it one.
    Text,
    /// Partial line that may still become a marker line.
    Pending,
    /// Complete line: a well-formed marker without task.
    Marker(Marker),
    /// Complete line: starts like a marker but is not well-formed.
    Malformed(String),
    /// A well-formed `[CREATE_*: target]` head; the task starts at byte
    /// `head_len` of the line.
    CreateHead {
        name: Name,
        target: String,
        head_len: usize,
    },
}

/// Judges a line (without `\n`) that starts at column 0 outside a fence.
/// `complete` says whether the line end (or end of stream) has been seen.
fn judge(line: &str, set: MarkerSet, complete: bool) -> Verdict {
    let Some(rest) = line.strip_prefix('[') else {
        return Verdict::Text;
    };
    for name in Name::ALL.into_iter().filter(|n| n.in_set(set)) {
        let name_str = name.as_str();
        if let Some(after) = rest.strip_prefix(name_str) {
            return match after.chars().next() {
                None => {
                    if complete {
                        Verdict::Malformed(missing_delimiter(name))
                    } else {
                        Verdict::Pending
                    }
                }
                Some(c) if c == ':' || c == ']' || c.is_whitespace() => {
                    judge_named(line, name, after, complete)
                }
                Some(_) => Verdict::Text,
            };
        }
        if !complete && name_str.starts_with(rest) {
            return Verdict::Pending;
        }
    }
    Verdict::Text
}

fn missing_delimiter(name: Name) -> String {
    if name == Name::SessionStatus {
        "expected `]` right after `SESSION_STATUS`".to_string()
    } else {
        format!("expected `:` right after `{}`", name.as_str())
    }
}

/// Second half of [`judge`]: the line is `[` + `name` + `after`, and `after`
/// is empty or starts with `:`, `]` or whitespace.
fn judge_named(line: &str, name: Name, after: &str, complete: bool) -> Verdict {
    if name.is_create() {
        if let Some((raw, task)) = after.strip_prefix(':').and_then(|b| b.split_once(']')) {
            let head_len = line.len().saturating_sub(task.len());
            let target = raw.trim();
            if head_len <= MAX_MARKER_LINE_BYTES && !target.is_empty() && !raw.contains('[') {
                return Verdict::CreateHead {
                    name,
                    target: target.to_string(),
                    head_len,
                };
            }
        }
    }
    if line.len() > MAX_MARKER_LINE_BYTES {
        return Verdict::Text;
    }
    if !complete {
        return Verdict::Pending;
    }
    let after = after.strip_suffix('\r').unwrap_or(after);
    match validate(name, after) {
        Ok(marker) => Verdict::Marker(marker),
        Err(reason) => Verdict::Malformed(reason),
    }
}

/// Validates a complete marker line's text after its name (line end removed).
/// Well-formed `CREATE_*` heads are handled by [`judge_named`] before this,
/// so for those names only the error cases matter here.
fn validate(name: Name, after: &str) -> Result<Marker, String> {
    if name == Name::SessionStatus {
        return match after.strip_prefix(']') {
            Some(trailing) if trailing.trim().is_empty() => Ok(Marker::SessionStatus),
            Some(_) => Err("unexpected text after `]`".to_string()),
            None if after.starts_with(':') => {
                Err("`SESSION_STATUS` takes no value; write `[SESSION_STATUS]`".to_string())
            }
            None => Err(missing_delimiter(name)),
        };
    }
    let Some(body) = after.strip_prefix(':') else {
        return Err(if after.starts_with(']') {
            format!("missing value; write `[{}: value]`", name.as_str())
        } else {
            missing_delimiter(name)
        });
    };
    let Some((raw, trailing)) = body.split_once(']') else {
        return Err("missing closing `]`".to_string());
    };
    if raw.contains('[') {
        return Err("`[` inside the value".to_string());
    }
    let value = raw.trim();
    if value.is_empty() {
        return Err("empty value".to_string());
    }
    let value = value.to_string();
    match name {
        Name::NetworkRequest | Name::StopSession if !trailing.trim().is_empty() => {
            Err("unexpected text after `]`".to_string())
        }
        Name::NetworkRequest => Ok(Marker::NetworkRequest { domain: value }),
        Name::StopSession => Ok(Marker::StopSession { id_prefix: value }),
        Name::CreateSession => Ok(Marker::CreateSession {
            target: value,
            task: trailing.trim().to_string(),
        }),
        Name::CreateReviewer => Ok(Marker::CreateReviewer {
            target: value,
            task: trailing.trim().to_string(),
        }),
        Name::SessionStatus => Ok(Marker::SessionStatus),
    }
}

/// An open code fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    ch: char,
    len: usize,
}

/// Incremental classifier of one line as a possible fence line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceScan {
    /// Only spaces so far (count).
    Indent(u8),
    /// Inside the run of fence characters.
    Run { ch: char, len: usize },
    /// After a run of at least three fence characters.
    Rest {
        ch: char,
        len: usize,
        backtick: bool,
        non_space: bool,
    },
    /// Cannot be a fence line.
    Plain,
}

impl FenceScan {
    fn push(&mut self, s: &str) {
        for c in s.chars() {
            if *self == FenceScan::Plain {
                return;
            }
            *self = self.step(c);
        }
    }

    fn step(self, c: char) -> FenceScan {
        match self {
            FenceScan::Indent(n) if c == ' ' && n < 3 => FenceScan::Indent(n.saturating_add(1)),
            FenceScan::Indent(_) if c == '`' || c == '~' => FenceScan::Run { ch: c, len: 1 },
            FenceScan::Indent(_) | FenceScan::Plain => FenceScan::Plain,
            FenceScan::Run { ch, len } if c == ch => FenceScan::Run {
                ch,
                len: len.saturating_add(1),
            },
            FenceScan::Run { len, .. } if len < 3 => FenceScan::Plain,
            FenceScan::Run { ch, len } => FenceScan::Rest {
                ch,
                len,
                backtick: c == '`',
                non_space: !c.is_whitespace(),
            },
            FenceScan::Rest {
                ch,
                len,
                backtick,
                non_space,
            } => FenceScan::Rest {
                ch,
                len,
                backtick: backtick || c == '`',
                non_space: non_space || !c.is_whitespace(),
            },
        }
    }

    /// Applies a finished line to the fence state.
    fn apply(self, fence: &mut Option<Fence>) {
        let (ch, len, info_backtick, closer_ok) = match self {
            FenceScan::Run { ch, len } if len >= 3 => (ch, len, false, true),
            FenceScan::Rest {
                ch,
                len,
                backtick,
                non_space,
            } => (ch, len, backtick, !non_space),
            _ => return,
        };
        match *fence {
            Some(open) => {
                if closer_ok && ch == open.ch && len >= open.len {
                    *fence = None;
                }
            }
            None => {
                if ch == '~' || !info_backtick {
                    *fence = Some(Fence { ch, len });
                }
            }
        }
    }
}

/// Where the scanner is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// Nothing of the current line seen yet.
    Start,
    /// The line so far is in `buf`, held because it may be a marker line.
    Held,
    /// The line is plain text; its beginning has been emitted already.
    Passing,
    /// A task is being captured; the current task line so far is in `buf`.
    Capturing,
}

/// A task being captured after a `CREATE_*` head.
#[derive(Debug, Clone)]
struct Capture {
    name: Name,
    target: String,
    task: String,
    /// Raw input bytes consumed by the task so far (line ends included).
    used: usize,
    /// `buf` holds the rest of the marker line itself (never ends the task).
    first_line: bool,
}

/// Incremental marker scanner; see the [module documentation](self) for the
/// grammar and the streaming guarantees.
///
/// Feed chunks with [`feed`](Self::feed), call [`finish`](Self::finish) at
/// the end of each agent turn or message. The scanner is reusable after
/// `finish`.
#[derive(Debug, Clone)]
pub struct MarkerScanner {
    set: MarkerSet,
    fence: Option<Fence>,
    line: LineState,
    fence_scan: FenceScan,
    buf: String,
    capture: Option<Capture>,
}

impl MarkerScanner {
    /// Creates a scanner recognising the markers of `set`, at the start of a
    /// line, outside any code fence.
    #[must_use]
    pub fn new(set: MarkerSet) -> Self {
        Self {
            set,
            fence: None,
            line: LineState::Start,
            fence_scan: FenceScan::Indent(0),
            buf: String::new(),
            capture: None,
        }
    }

    /// The marker set this scanner recognises.
    #[must_use]
    pub fn marker_set(&self) -> MarkerSet {
        self.set
    }

    /// Scans the next chunk of agent text. Returns the events that are
    /// decided so far (possibly none); adjacent text is merged into one
    /// [`ScanEvent::Text`]. Never panics.
    pub fn feed(&mut self, chunk: &str) -> Vec<ScanEvent> {
        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some((piece, tail)) = rest.split_once('\n') {
            self.push_piece(piece, &mut out);
            self.end_line(true, &mut out);
            rest = tail;
        }
        self.push_piece(rest, &mut out);
        out
    }

    /// End of the agent's turn or message: resolves everything held back (an
    /// unterminated line that could have been a marker is judged as a
    /// complete line, a task being captured ends here) and returns the
    /// resulting events. Afterwards the scanner is as new: at column 0, no
    /// open fence.
    pub fn finish(&mut self) -> Vec<ScanEvent> {
        let mut out = Vec::new();
        self.end_line(false, &mut out);
        self.end_capture(&mut out);
        self.reset();
        out
    }

    /// Starts afresh for a new turn: clears the fence state and discards
    /// anything held back without emitting it (call [`finish`](Self::finish)
    /// first to get it).
    pub fn reset(&mut self) {
        self.fence = None;
        self.line = LineState::Start;
        self.fence_scan = FenceScan::Indent(0);
        self.buf.clear();
        self.capture = None;
    }

    /// Handles text of the current line (contains no `\n`).
    fn push_piece(&mut self, piece: &str, out: &mut Vec<ScanEvent>) {
        if piece.is_empty() {
            return;
        }
        match self.line {
            LineState::Start => {
                self.fence_scan.push(piece);
                if self.fence.is_none() && piece.starts_with('[') {
                    self.line = LineState::Held;
                    self.buf.push_str(piece);
                    self.check_held(out);
                } else {
                    self.line = LineState::Passing;
                    emit_text(out, piece);
                }
            }
            LineState::Held => {
                self.fence_scan.push(piece);
                self.buf.push_str(piece);
                self.check_held(out);
            }
            LineState::Passing => {
                self.fence_scan.push(piece);
                emit_text(out, piece);
            }
            LineState::Capturing => {
                self.buf.push_str(piece);
                let over = self
                    .capture
                    .as_ref()
                    .is_some_and(|cap| cap.used.saturating_add(self.buf.len()) > MAX_TASK_BYTES);
                if over {
                    self.abandon_task_line(out);
                }
            }
        }
    }

    /// Re-judges the held partial line after it grew.
    fn check_held(&mut self, out: &mut Vec<ScanEvent>) {
        match judge(&self.buf, self.set, false) {
            Verdict::Pending => {}
            Verdict::CreateHead {
                name,
                target,
                head_len,
            } => {
                let task_part = self.buf.get(head_len..).unwrap_or_default().to_string();
                self.buf.clear();
                self.start_capture(name, target);
                self.push_piece(&task_part, out);
            }
            // `Marker`/`Malformed` are only produced for complete lines.
            Verdict::Text | Verdict::Marker(_) | Verdict::Malformed(_) => {
                emit_text(out, &self.buf);
                self.buf.clear();
                self.line = LineState::Passing;
            }
        }
    }

    fn start_capture(&mut self, name: Name, target: String) {
        self.capture = Some(Capture {
            name,
            target,
            task: String::new(),
            used: 0,
            first_line: true,
        });
        self.line = LineState::Capturing;
        // The marker line starts with `[`: it is not a fence line.
        self.fence_scan = FenceScan::Plain;
    }

    /// The current task line (in `buf`) does not fit in the task: the task
    /// ends before it and the line is scanned as ordinary text.
    fn abandon_task_line(&mut self, out: &mut Vec<ScanEvent>) {
        let first_line = self.capture.as_ref().is_some_and(|cap| cap.first_line);
        self.end_capture(out);
        let line = mem::take(&mut self.buf);
        if first_line {
            // Rest of the marker line: mid-line, so plain text.
            self.line = LineState::Passing;
            self.fence_scan = FenceScan::Plain;
            emit_text(out, &line);
        } else {
            self.line = LineState::Start;
            self.fence_scan = FenceScan::Indent(0);
            self.push_piece(&line, out);
        }
    }

    /// Emits the marker of the task being captured, if any.
    fn end_capture(&mut self, out: &mut Vec<ScanEvent>) {
        let Some(cap) = self.capture.take() else {
            return;
        };
        if self.line == LineState::Capturing {
            self.line = LineState::Start;
        }
        let task = cap.task.trim().to_string();
        let marker = match cap.name {
            Name::CreateReviewer => Marker::CreateReviewer {
                target: cap.target,
                task,
            },
            _ => Marker::CreateSession {
                target: cap.target,
                task,
            },
        };
        out.push(ScanEvent::Marker(marker));
    }

    /// Ends the current line: `newline` is true when a `\n` arrived, false
    /// at the end of the stream.
    fn end_line(&mut self, newline: bool, out: &mut Vec<ScanEvent>) {
        let nl = if newline { "\n" } else { "" };
        match self.line {
            LineState::Start | LineState::Passing => {
                emit_text(out, nl);
                self.next_line();
            }
            LineState::Held => {
                let line = mem::take(&mut self.buf);
                match judge(&line, self.set, true) {
                    Verdict::Text | Verdict::Pending => {
                        emit_text(out, &line);
                        emit_text(out, nl);
                        self.next_line();
                    }
                    Verdict::Marker(marker) => {
                        out.push(ScanEvent::Marker(marker));
                        self.next_line();
                    }
                    Verdict::Malformed(reason) => {
                        let line = line.strip_suffix('\r').unwrap_or(&line).to_string();
                        out.push(ScanEvent::Marker(Marker::Malformed { line, reason }));
                        self.next_line();
                    }
                    Verdict::CreateHead {
                        name,
                        target,
                        head_len,
                    } => {
                        // Normally caught while the line was partial.
                        self.buf = line.get(head_len..).unwrap_or_default().to_string();
                        self.start_capture(name, target);
                        self.end_line(newline, out);
                    }
                }
            }
            LineState::Capturing => self.end_task_line(newline, out),
        }
    }

    fn end_task_line(&mut self, newline: bool, out: &mut Vec<ScanEvent>) {
        let Some(cap) = self.capture.as_mut() else {
            // Unreachable: `Capturing` always has a capture.
            self.line = LineState::Start;
            return self.end_line(newline, out);
        };
        let len = self.buf.len().saturating_add(usize::from(newline));
        if cap.used.saturating_add(len) > MAX_TASK_BYTES {
            self.abandon_task_line(out);
            return self.end_line(newline, out);
        }
        let text = self.buf.strip_suffix('\r').unwrap_or(&self.buf);
        if cap.first_line {
            cap.first_line = false;
            cap.task.push_str(text.trim());
        } else if text.trim().is_empty() {
            if !newline && self.buf.is_empty() {
                // End of stream right after a task line: nothing to do.
                return;
            }
            // Blank line: ends the task and is itself ordinary text.
            let blank = mem::take(&mut self.buf);
            self.end_capture(out);
            emit_text(out, &blank);
            emit_text(out, if newline { "\n" } else { "" });
            self.next_line();
            return;
        } else {
            cap.task.push('\n');
            cap.task.push_str(text);
        }
        cap.used = cap.used.saturating_add(len);
        self.buf.clear();
    }

    /// Prepares for the next line (column 0) after a non-task line ended.
    fn next_line(&mut self) {
        let scan = mem::replace(&mut self.fence_scan, FenceScan::Indent(0));
        scan.apply(&mut self.fence);
        self.line = LineState::Start;
    }
}

/// Appends text to `out`, merging with a preceding text event.
fn emit_text(out: &mut Vec<ScanEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(ScanEvent::Text(last)) = out.last_mut() {
        last.push_str(text);
    } else {
        out.push(ScanEvent::Text(text.to_string()));
    }
}
