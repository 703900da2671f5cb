//! Normalisation and validation of host names before they reach the
//! firewall.
//!
//! [`parse_domain`] turns the raw value of a `[NETWORK_REQUEST: …]` marker
//! into a [`Domain`]: a lower-case ASCII host name (IDNs in punycode) that is
//! safe to show to a person for approval and to hand to the firewall. Anything
//! that is not a plain host name is rejected with a [`DomainError`] saying
//! why.
//!
//! # Checks, in order
//!
//! The first failing check decides the error.
//!
//! 1. Empty input → [`DomainError::Empty`].
//! 2. Character scan, first offending character wins: a control character
//!    (Unicode `Cc`, e.g. NUL, tab, newline) → [`DomainError::ControlCharacter`];
//!    other whitespace (space, NBSP, U+3000, line separators, …) →
//!    [`DomainError::Whitespace`]; invisible formatting characters (Unicode
//!    `Cf` and the default-ignorable code points: zero-width space / joiners,
//!    bidirectional overrides and isolates, soft hyphen, BOM, variation
//!    selectors, tag characters, …; [`crate::text::is_invisible`]) →
//!    [`DomainError::InvisibleCharacter`].
//!    Nothing is trimmed: leading or trailing whitespace is an error too.
//! 3. IPv6 literals (`::1`, `[::1]`, `[::1]:443`, `fe80::1%eth0`) →
//!    [`DomainError::IpAddress`].
//! 4. URL pieces: `://` → [`DomainError::Scheme`]; `@` →
//!    [`DomainError::UserInfo`] (so `user:pass@host` and `mailto:a@b` are
//!    reported as user information); a `scheme:` prefix (a letter, then
//!    letters, digits, `+` or `-`, not followed by a numeric port, e.g.
//!    `http:pypi.org`) → [`DomainError::Scheme`]; `/`, `?`,
//!    `#`, `\` → [`DomainError::Path`]; any other `:` →
//!    [`DomainError::Port`]; `*` → [`DomainError::Wildcard`]; `_` →
//!    [`DomainError::Underscore`]; any other ASCII character that is not a
//!    letter, digit, `-` or `.` (`;`, `|`, `$`, quotes, backticks, brackets,
//!    …) → [`DomainError::ForbiddenCharacter`].
//! 5. More than 1024 characters → [`DomainError::NameTooLong`]: a cheap
//!    bound on the work below. Such input cannot become a valid name (NFC
//!    composes at most four input characters into one code point, and every
//!    code point takes at least one ASCII character), so step 9 would reject
//!    it anyway.
//! 6. UTS #46 `ToASCII` with the `idna` crate (non-transitional, STD3 ASCII
//!    rules, hyphen and DNS-length checks left to the steps below): lower-cases,
//!    maps compatibility forms (full-width letters, `。` `．` `｡` to `.`) and
//!    punycode-encodes IDN labels; labels given as `xn--…` are decoded and
//!    validated. Failure → [`DomainError::InvalidIdna`].
//! 7. One trailing dot (FQDN form) is removed; an empty label anywhere else
//!    (`a..b`, `.a.b`, `a.b..`) → [`DomainError::EmptyLabel`].
//! 8. Numeric hosts that a resolver would read as IPv4 (`1.2.3.4`, `127.1`,
//!    `0x7f.1`, `017.0.0.1`, `2130706433`, `0x7f000001`): the last label is
//!    all digits, or `0x` followed only by hex digits →
//!    [`DomainError::IpAddress`].
//! 9. Fewer than two labels (`localhost`) → [`DomainError::SingleLabel`];
//!    each label must be 1–63 characters of `[a-z0-9-]`
//!    ([`DomainError::ForbiddenCharacter`], [`DomainError::LabelTooLong`]),
//!    not starting or ending with `-` ([`DomainError::HyphenAtLabelEdge`]);
//!    `--` in positions 3–4 is allowed (real CDN names use it). The whole name
//!    is at most 253 characters → [`DomainError::NameTooLong`].
//! 10. Homoglyph / mixed-script defence, for every `xn--` label, decoded to
//!     Unicode (UTS #39):
//!     * every character must be allowed by the General Security Profile
//!       for identifiers (`Identifier_Status=Allowed`), which excludes e.g.
//!       emoji, symbols, compatibility and obsolete characters →
//!       [`DomainError::RestrictedCharacter`];
//!     * the label must be single-script: its resolved augmented script set
//!       is not empty, ignoring `Common`/`Inherited` (Japanese may mix Han,
//!       Hiragana and Katakana, Korean Han and Hangul) →
//!       [`DomainError::MixedScript`] (catches `аpple` with a Cyrillic `а`,
//!       `gοogle` with a Greek `ο`);
//!     * the label's confusable skeleton must not be pure ASCII — a label
//!       that looks exactly like some ASCII string imitates an ASCII name
//!       (whole-script Cyrillic `раураӏ` for `paypal`, `аррӏе`, dotless
//!       `ıntel`) → [`DomainError::AsciiLookalike`].
//!
//! # Resulting policy for IDNs
//!
//! Accepted: single-script labels whose characters are allowed identifier
//! characters and that do not look like pure ASCII — Latin with diacritics
//! (`münchen.de` → `xn--mnchen-3ya.de`: the skeleton keeps the combining
//! diaeresis), Cyrillic (`пример.рф`), Greek (`δοκιμή.gr`), Japanese
//! (`例え.jp`), Korean, Chinese, and so on. Rejected: mixed-script labels,
//! whole-script look-alikes of ASCII text (including legitimate words written
//! only with Latin-looking letters, e.g. Cyrillic `сосо`), emoji and other
//! non-identifier characters. Labels are judged one by one, so
//! `пример.com` is accepted. A Latin label with visible diacritics that
//! resembles a brand (`paypäl`) is accepted: it is not a pixel-identical
//! imitation and a person approving it sees the punycode form.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};
use unicode_security::{skeleton, GeneralSecurityProfile, MixedScript};

use crate::text::is_invisible;

/// Longest host name, in bytes, without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;

/// Longest label, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// Raw inputs with more characters than this are rejected before UTS #46.
const MAX_INPUT_CHARS: usize = 1024;

/// Characters of the raw input kept in an error (the rest is cut, `…` added).
const EXCERPT_CHARS: usize = 80;

/// A validated host name: lower-case ASCII, labels of `[a-z0-9-]` joined by
/// single dots, no trailing dot, at least two labels, not an IP address,
/// IDN labels in punycode (`xn--…`). Only [`parse_domain`] creates one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    /// The normalised host name, e.g. `pypi.org` or `xn--mnchen-3ya.de`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the domain, returning the normalised host name.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Domain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Domain {
    type Err = DomainError;

    /// Same as [`parse_domain`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_domain(s)
    }
}

/// Why a raw string is not an acceptable host name. Every variant except
/// [`DomainError::Empty`] carries `input`: the raw input cut to 80 characters
/// (then `…` appended), with control, invisible and non-space whitespace
/// characters escaped (`\n`, `\u{202e}`), so it is safe to print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The input is empty.
    #[error("the domain is empty; give a host name such as `pypi.org`")]
    Empty,
    /// The input contains whitespace (including leading or trailing).
    #[error("`{input}` contains whitespace; give a bare host name such as `pypi.org`")]
    Whitespace {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input contains a control character (Unicode `Cc`: NUL, tab,
    /// newline, …).
    #[error("`{input}` contains a control character; give a bare host name such as `pypi.org`")]
    ControlCharacter {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input contains an invisible formatting character (zero-width,
    /// bidirectional control, soft hyphen, …).
    #[error("`{input}` contains an invisible formatting character (zero-width or bidirectional control)")]
    InvisibleCharacter {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input is an IP address (IPv4 in any resolver form, or IPv6).
    #[error("`{input}` is an IP address; only host names can be approved")]
    IpAddress {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input has a URL scheme (`https://…`, `mailto:`).
    #[error("`{input}` is a URL; give the host name only, without a scheme such as `https://`")]
    Scheme {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input has user information (`user@host`).
    #[error("`{input}` contains `@` (user information); give the host name only")]
    UserInfo {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input has a path, query or fragment (`/`, `?`, `#`, `\`).
    #[error("`{input}` contains a path, query or fragment; give the host name only")]
    Path {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input has a port (`host:443`) or another `:`.
    #[error("`{input}` contains `:` (a port?); give the host name only")]
    Port {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input contains `*`.
    #[error("`{input}` contains a wildcard; only exact host names can be approved")]
    Wildcard {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input contains `_`, which host names may not.
    #[error("`{input}` contains `_`, which is not allowed in host names")]
    Underscore {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The input contains an ASCII character other than letters, digits,
    /// `-` and `.` not covered by a more specific variant (`;`, `|`, `$`,
    /// quotes, backticks, brackets, …).
    #[error("`{input}` contains {character:?}, which is not allowed in host names")]
    ForbiddenCharacter {
        /// Escaped, truncated raw input.
        input: String,
        /// The first offending character.
        character: char,
    },
    /// UTS #46 (IDNA) processing rejected the input (disallowed code point,
    /// invalid punycode, bidi or joiner rule, …).
    #[error("`{input}` is not a valid internationalised domain name")]
    InvalidIdna {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The name has an empty label (`a..b`, a leading dot, or more than one
    /// trailing dot).
    #[error("`{input}` has an empty label (`..`, a leading dot or a doubled trailing dot)")]
    EmptyLabel {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The name has a single label (`localhost`).
    #[error("`{input}` is not a fully qualified host name; give one such as `pypi.org`")]
    SingleLabel {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// A label (in ASCII form) is longer than 63 characters.
    #[error("`{input}` has a label longer than 63 characters")]
    LabelTooLong {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// The name (in ASCII form, without trailing dot) is longer than 253
    /// characters.
    #[error("`{input}` is longer than 253 characters")]
    NameTooLong {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// A label starts or ends with `-`.
    #[error("`{input}` has a label that starts or ends with `-`")]
    HyphenAtLabelEdge {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// An IDN label contains a character that UTS #39 restricts in
    /// identifiers (emoji, symbols, obsolete or compatibility characters).
    #[error(
        "`{input}` contains {character:?}, which is not allowed in internationalised host names"
    )]
    RestrictedCharacter {
        /// Escaped, truncated raw input.
        input: String,
        /// The first offending character (decoded from punycode).
        character: char,
    },
    /// An IDN label mixes scripts (e.g. Latin with a Cyrillic `а`).
    #[error("`{input}` mixes writing systems in one label, a common look-alike trick")]
    MixedScript {
        /// Escaped, truncated raw input.
        input: String,
    },
    /// An IDN label is a look-alike of ASCII text (e.g. Cyrillic `раураl`
    /// for `paypal`).
    #[error("`{input}` imitates an ASCII name with look-alike characters; give the real name")]
    AsciiLookalike {
        /// Escaped, truncated raw input.
        input: String,
    },
}

/// Validates and normalises a host name; see the [module documentation](self)
/// for the exact checks and their order.
///
/// Returns the lower-case ASCII form (`PyPI.ORG.` → `pypi.org`,
/// `ｐｙｐｉ．ｏｒｇ` → `pypi.org`, `münchen.de` → `xn--mnchen-3ya.de`), or the
/// first reason the input is not an acceptable host name. Never panics.
/// `parse_domain(d.as_str())` returns `d` again for every accepted `d`.
///
/// # Errors
///
/// The [`DomainError`] variant of the first failed check, carrying an
/// escaped excerpt of `raw` (see the module documentation for the order).
pub fn parse_domain(raw: &str) -> Result<Domain, DomainError> {
    if raw.is_empty() {
        return Err(DomainError::Empty);
    }
    let input = || excerpt(raw);

    for c in raw.chars() {
        if c.is_control() {
            return Err(DomainError::ControlCharacter { input: input() });
        }
        if c.is_whitespace() {
            return Err(DomainError::Whitespace { input: input() });
        }
        // UTS #46 silently drops some of these, so they are rejected before it runs.
        if is_invisible(c) {
            return Err(DomainError::InvisibleCharacter { input: input() });
        }
    }

    if is_ipv6_literal(raw) {
        return Err(DomainError::IpAddress { input: input() });
    }
    if raw.contains("://") {
        return Err(DomainError::Scheme { input: input() });
    }
    if raw.contains('@') {
        return Err(DomainError::UserInfo { input: input() });
    }
    if has_scheme_prefix(raw) {
        return Err(DomainError::Scheme { input: input() });
    }
    if raw.contains(['/', '?', '#', '\\']) {
        return Err(DomainError::Path { input: input() });
    }
    if raw.contains(':') {
        return Err(DomainError::Port { input: input() });
    }
    if raw.contains('*') {
        return Err(DomainError::Wildcard { input: input() });
    }
    if raw.contains('_') {
        return Err(DomainError::Underscore { input: input() });
    }
    if let Some(character) = raw
        .chars()
        .find(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(DomainError::ForbiddenCharacter {
            input: input(),
            character,
        });
    }
    if raw.chars().count() > MAX_INPUT_CHARS {
        return Err(DomainError::NameTooLong { input: input() });
    }

    let ascii = Uts46::new()
        .to_ascii(
            raw.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map_err(|_| DomainError::InvalidIdna { input: input() })?;

    let name = ascii.strip_suffix('.').unwrap_or(&ascii);
    if name.split('.').any(str::is_empty) {
        return Err(DomainError::EmptyLabel { input: input() });
    }
    let last = name.rsplit('.').next().unwrap_or_default();
    if is_numeric_label(last) {
        return Err(DomainError::IpAddress { input: input() });
    }
    if !name.contains('.') {
        return Err(DomainError::SingleLabel { input: input() });
    }
    for label in name.split('.') {
        if let Some(character) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(DomainError::ForbiddenCharacter {
                input: input(),
                character,
            });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(DomainError::LabelTooLong { input: input() });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(DomainError::HyphenAtLabelEdge { input: input() });
        }
    }
    if name.len() > MAX_NAME_LEN {
        return Err(DomainError::NameTooLong { input: input() });
    }
    for label in name.split('.') {
        check_idn_label(label).map_err(|e| e.with_input(input()))?;
    }
    Ok(Domain(name.to_string()))
}

/// Outcome of the homoglyph checks on one label, before the input is known.
enum LabelProblem {
    Invalid,
    Restricted(char),
    MixedScript,
    AsciiLookalike,
}

impl LabelProblem {
    fn with_input(self, input: String) -> DomainError {
        match self {
            LabelProblem::Invalid => DomainError::InvalidIdna { input },
            LabelProblem::Restricted(character) => {
                DomainError::RestrictedCharacter { input, character }
            }
            LabelProblem::MixedScript => DomainError::MixedScript { input },
            LabelProblem::AsciiLookalike => DomainError::AsciiLookalike { input },
        }
    }
}

/// UTS #39 checks on an ASCII label; only `xn--` labels are examined.
fn check_idn_label(label: &str) -> Result<(), LabelProblem> {
    let Some(encoded) = label.strip_prefix("xn--") else {
        return Ok(());
    };
    let decoded = idna::punycode::decode_to_string(encoded).ok_or(LabelProblem::Invalid)?;
    if let Some(c) = decoded.chars().find(|c| !c.identifier_allowed()) {
        return Err(LabelProblem::Restricted(c));
    }
    if !decoded.as_str().is_single_script() {
        return Err(LabelProblem::MixedScript);
    }
    if skeleton(&decoded).all(|c| c.is_ascii()) {
        return Err(LabelProblem::AsciiLookalike);
    }
    Ok(())
}

/// True for a label a resolver would read as a number: all decimal digits
/// (octal too), or `0x` followed only by hex digits (possibly none).
fn is_numeric_label(label: &str) -> bool {
    if !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    label
        .strip_prefix("0x")
        .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `::1`, `[::1]`, `[::1]:443`, `fe80::1%eth0`, `[fe80::1%25eth0]`.
fn is_ipv6_literal(raw: &str) -> bool {
    let inner = raw
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map_or(raw, |(inside, _)| inside);
    let addr = inner.split('%').next().unwrap_or(inner);
    addr.contains(':') && addr.parse::<Ipv6Addr>().is_ok()
}

/// A leading `scheme:` (RFC 3986 scheme syntax without a dot) that is not
/// followed by a numeric port.
fn has_scheme_prefix(raw: &str) -> bool {
    let Some((head, tail)) = raw.split_once(':') else {
        return false;
    };
    let is_port = !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit());
    let mut chars = head.chars();
    let scheme_like = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-');
    scheme_like && !is_port
}

/// The raw input made safe to print: at most [`EXCERPT_CHARS`] characters
/// (then `…`), with control, invisible and non-space whitespace characters
/// escaped.
fn excerpt(raw: &str) -> String {
    let mut out = String::new();
    for (i, c) in raw.chars().enumerate() {
        if i == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() || is_invisible(c) || (c.is_whitespace() && c != ' ') {
            out.extend(c.escape_debug());
            if c.escape_debug().len() == 1 {
                // `escape_debug` left it alone; force a visible form.
                out.pop();
                out.extend(c.escape_unicode());
            }
        } else {
            out.push(c);
        }
    }
    out
}
