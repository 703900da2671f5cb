//! Tests for host name normalisation and validation.

use std::collections::HashSet;

use proptest::prelude::*;
use session_manager::firewall::domain::{parse_domain, Domain, DomainError};

/// The variant name of an error, for table-driven assertions.
fn kind(e: &DomainError) -> &'static str {
    match e {
        DomainError::Empty => "Empty",
        DomainError::Whitespace { .. } => "Whitespace",
        DomainError::ControlCharacter { .. } => "ControlCharacter",
        DomainError::InvisibleCharacter { .. } => "InvisibleCharacter",
        DomainError::IpAddress { .. } => "IpAddress",
        DomainError::Scheme { .. } => "Scheme",
        DomainError::UserInfo { .. } => "UserInfo",
        DomainError::Path { .. } => "Path",
        DomainError::Port { .. } => "Port",
        DomainError::Wildcard { .. } => "Wildcard",
        DomainError::Underscore { .. } => "Underscore",
        DomainError::ForbiddenCharacter { .. } => "ForbiddenCharacter",
        DomainError::InvalidIdna { .. } => "InvalidIdna",
        DomainError::EmptyLabel { .. } => "EmptyLabel",
        DomainError::SingleLabel { .. } => "SingleLabel",
        DomainError::LabelTooLong { .. } => "LabelTooLong",
        DomainError::NameTooLong { .. } => "NameTooLong",
        DomainError::HyphenAtLabelEdge { .. } => "HyphenAtLabelEdge",
        DomainError::RestrictedCharacter { .. } => "RestrictedCharacter",
        DomainError::MixedScript { .. } => "MixedScript",
        DomainError::AsciiLookalike { .. } => "AsciiLookalike",
    }
}

fn bad_cases() -> Vec<(String, &'static str)> {
    let s = |x: &str, k: &'static str| (x.to_string(), k);
    let label63 = "a".repeat(63);
    let label64 = "a".repeat(64);
    // 254 characters: four 62-char labels plus "abcd" would be 254.
    let name254 = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62)
    );
    assert_eq!(name254.len(), 254);
    vec![
        s("", "Empty"),
        // --- IPv4 in every form a resolver accepts
        s("1.2.3.4", "IpAddress"),
        s("10.0.0.1", "IpAddress"),
        s("127.0.0.1", "IpAddress"),
        s("127.1", "IpAddress"),
        s("0x7f.1", "IpAddress"),
        s("0x7f000001", "IpAddress"),
        s("0X7F000001", "IpAddress"),
        s("2130706433", "IpAddress"),
        s("017.0.0.1", "IpAddress"),
        s("0177.0.0.01", "IpAddress"),
        s("1.2.3.4.", "IpAddress"),
        s("255.255.255.255", "IpAddress"),
        s("0", "IpAddress"),
        s("169.254.169.254", "IpAddress"),
        s("0x7f.0x0.0x0.0x1", "IpAddress"),
        s("example.0x", "IpAddress"),
        s("example.123", "IpAddress"),
        s("１２７．０．０．１", "IpAddress"),
        // --- IPv6
        s("::1", "IpAddress"),
        s("[::1]", "IpAddress"),
        s("[::1]:443", "IpAddress"),
        s("fe80::1%eth0", "IpAddress"),
        s("[fe80::1%25eth0]", "IpAddress"),
        s("::ffff:127.0.0.1", "IpAddress"),
        s("2001:db8::1", "IpAddress"),
        s("::", "IpAddress"),
        // --- wildcards
        s("*.example.com", "Wildcard"),
        s("*", "Wildcard"),
        s("pypi.*", "Wildcard"),
        s("a*b.com", "Wildcard"),
        // --- ports
        s("pypi.org:443", "Port"),
        s("localhost:8080", "Port"),
        s("pypi.org:", "Port"),
        s("1.2.3.4:80", "Port"),
        s("a.b:c:d", "Port"),
        // --- schemes
        s("https://pypi.org", "Scheme"),
        s("http://pypi.org/simple", "Scheme"),
        s("ftp://files.example.com", "Scheme"),
        s("file:///etc/passwd", "Scheme"),
        s("//pypi.org", "Path"),
        s("mailto:root@example.com", "UserInfo"),
        s("mailto:root", "Scheme"),
        s("javascript:alert(1)", "Scheme"),
        s("http:pypi.org", "Scheme"),
        s("git+ssh://git@github.com", "Scheme"),
        // --- paths, queries, fragments
        s("pypi.org/simple", "Path"),
        s("pypi.org/", "Path"),
        s("pypi.org?x=1", "Path"),
        s("pypi.org#frag", "Path"),
        s("pypi.org\\evil", "Path"),
        s("pypi.org:443/simple", "Path"),
        s("/etc/hosts", "Path"),
        // --- user info
        s("user@pypi.org", "UserInfo"),
        s("user:pass@pypi.org", "UserInfo"),
        s("@pypi.org", "UserInfo"),
        // --- shell and other punctuation
        s("pypi.org;rm", "ForbiddenCharacter"),
        s("pypi.org|sh", "ForbiddenCharacter"),
        s("$(reboot).com", "ForbiddenCharacter"),
        s("${HOME}.com", "ForbiddenCharacter"),
        s("`id`.com", "ForbiddenCharacter"),
        s("'pypi.org'", "ForbiddenCharacter"),
        s("\"pypi.org\"", "ForbiddenCharacter"),
        s("pypi.org&&x", "ForbiddenCharacter"),
        s("pypi.org>x", "ForbiddenCharacter"),
        s("<pypi.org>", "ForbiddenCharacter"),
        s("pypi!.org", "ForbiddenCharacter"),
        s("pypi%2eorg", "ForbiddenCharacter"),
        s("a,b.com", "ForbiddenCharacter"),
        s("a+b.com", "ForbiddenCharacter"),
        s("a=b.com", "ForbiddenCharacter"),
        s("[pypi.org]", "ForbiddenCharacter"),
        s("{a}.com", "ForbiddenCharacter"),
        s("a~b.com", "ForbiddenCharacter"),
        s("a^b.com", "ForbiddenCharacter"),
        // --- whitespace and control characters
        s(" pypi.org", "Whitespace"),
        s("pypi.org ", "Whitespace"),
        s("pypi .org", "Whitespace"),
        s("pypi\u{a0}.org", "Whitespace"),
        s("pypi\u{3000}.org", "Whitespace"),
        s("pypi\u{2028}.org", "Whitespace"),
        s("pypi.org\n", "ControlCharacter"),
        s("pypi.org\nevil.com", "ControlCharacter"),
        s("pypi\t.org", "ControlCharacter"),
        s("pypi.org\r", "ControlCharacter"),
        s("pypi\0.org", "ControlCharacter"),
        s("pypi\u{1b}[31m.org", "ControlCharacter"),
        s("pypi\u{7f}.org", "ControlCharacter"),
        s("pypi\u{85}.org", "ControlCharacter"),
        // --- invisible characters
        s("pay\u{200d}pal.com", "InvisibleCharacter"),
        s("pay\u{200c}pal.com", "InvisibleCharacter"),
        s("\u{200b}pypi.org", "InvisibleCharacter"),
        s("pypi.org\u{feff}", "InvisibleCharacter"),
        s("pay\u{ad}pal.com", "InvisibleCharacter"),
        s("moc.\u{202e}elgoog", "InvisibleCharacter"),
        s("\u{202d}pypi.org", "InvisibleCharacter"),
        s("pypi\u{2066}.org", "InvisibleCharacter"),
        s("pypi\u{200f}.org", "InvisibleCharacter"),
        s("pypi\u{fe0f}.org", "InvisibleCharacter"),
        s("pypi\u{e0041}.org", "InvisibleCharacter"),
        s("pypi\u{2060}.org", "InvisibleCharacter"),
        // --- underscore
        s("_dmarc.example.com", "Underscore"),
        s("my_host.example.com", "Underscore"),
        // --- lengths
        s(&format!("{label64}.com"), "LabelTooLong"),
        s(&format!("a.{label64}"), "LabelTooLong"),
        s(&name254, "NameTooLong"),
        s(&format!("{name254}."), "NameTooLong"),
        s(&format!("{label63}.{}", "a.".repeat(200)), "NameTooLong"),
        s(&"a.".repeat(600), "NameTooLong"), // over the 1024-char fast path
        // --- empty labels
        s("a..b", "EmptyLabel"),
        s(".pypi.org", "EmptyLabel"),
        s("pypi.org..", "EmptyLabel"),
        s(".", "EmptyLabel"),
        s("..", "EmptyLabel"),
        s("pypi。。org", "EmptyLabel"),
        // --- hyphens
        s("-pypi.org", "HyphenAtLabelEdge"),
        s("pypi-.org", "HyphenAtLabelEdge"),
        s("pypi.-org", "HyphenAtLabelEdge"),
        s("pypi.org-", "HyphenAtLabelEdge"),
        s("-.com", "HyphenAtLabelEdge"),
        // --- single label
        s("localhost", "SingleLabel"),
        s("localhost.", "SingleLabel"),
        s("metadata", "SingleLabel"),
        s("xn--mnchen-3ya", "SingleLabel"),
        // --- invalid IDNA
        s("xn--abc.com", "InvalidIdna"),
        s("xn--pypi-.org", "InvalidIdna"),
        s("xn--.com", "InvalidIdna"),
        s("pypi.org：443", "InvalidIdna"),
        s("ａ＿b.com", "InvalidIdna"),
        s("pypi\u{ff0f}org.com", "InvalidIdna"),
        s("١٢٣.com", "InvalidIdna"),
        s("a\u{301}b\u{5d0}.com", "InvalidIdna"),
        s("\u{fffd}.com", "InvalidIdna"),
        s("\u{e000}.com", "InvalidIdna"),
        // --- homoglyphs: mixed script inside a Latin name
        s("аpple.com", "MixedScript"),          // Cyrillic а
        s("xn--pple-43d.com", "MixedScript"),   // the same, as punycode
        s("pаypal.com", "MixedScript"),         // Cyrillic а
        s("xn--pypal-4ve.com", "MixedScript"),  // the same, as punycode
        s("раураl.com", "MixedScript"),         // Cyrillic р а у р а + Latin l
        s("xn--l-7sba6dbr.com", "MixedScript"), // the same, as punycode
        s("gοogle.com", "MixedScript"),         // Greek ο
        s("xn--gogle-rce.com", "MixedScript"),  // the same, as punycode
        s("gооgle.com", "MixedScript"),         // two Cyrillic о
        s("micrоsoft.com", "MixedScript"),      // Cyrillic о
        s("faceboоk.com", "MixedScript"),       // Cyrillic о
        s("aΣ.com", "MixedScript"),             // Latin + Greek
        s("pypi.orgа", "MixedScript"),          // Cyrillic а in the TLD
        // --- homoglyphs: whole-script look-alikes of ASCII names
        s("раураӏ.com", "AsciiLookalike"), // all Cyrillic "paypal"
        s("xn--80aa0cbo65f.com", "AsciiLookalike"), // the same, as punycode
        s("аррӏе.com", "AsciiLookalike"),  // all Cyrillic "apple"
        s("xn--80ak6aa92e.com", "AsciiLookalike"), // the same, as punycode
        s("ѕсоре.com", "AsciiLookalike"),  // all Cyrillic "scope"
        s("сосо.com", "AsciiLookalike"),   // all Cyrillic "coco"
        s("αρρ.com", "AsciiLookalike"),    // all Greek "app"
        s("ıntel.com", "AsciiLookalike"),  // Latin dotless ı
        s("xn--ntel-kza.com", "AsciiLookalike"), // the same, as punycode
        // --- characters outside the identifier profile
        s("💩.la", "RestrictedCharacter"),
        s("xn--ls8h.la", "RestrictedCharacter"),
        s("☃.net", "RestrictedCharacter"),
        s("a♥.com", "RestrictedCharacter"),
    ]
}

#[test]
fn bad_inputs_are_rejected_with_the_right_reason() {
    let cases = bad_cases();
    let distinct: HashSet<&String> = cases.iter().map(|(input, _)| input).collect();
    assert_eq!(distinct.len(), cases.len(), "duplicate test input");
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (input, expected) in &cases {
        match parse_domain(input) {
            Ok(d) => failures.push(format!("{input:?}: accepted as {d}")),
            Err(e) if kind(&e) != *expected => {
                failures.push(format!("{input:?}: expected {expected}, got {e:?}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_error_variant_is_exercised() {
    let seen: HashSet<&str> = bad_cases().iter().map(|(_, k)| *k).collect();
    for k in [
        "Empty",
        "Whitespace",
        "ControlCharacter",
        "InvisibleCharacter",
        "IpAddress",
        "Scheme",
        "UserInfo",
        "Path",
        "Port",
        "Wildcard",
        "Underscore",
        "ForbiddenCharacter",
        "InvalidIdna",
        "EmptyLabel",
        "SingleLabel",
        "LabelTooLong",
        "NameTooLong",
        "HyphenAtLabelEdge",
        "RestrictedCharacter",
        "MixedScript",
        "AsciiLookalike",
    ] {
        assert!(seen.contains(k), "{k} not covered");
    }
}

#[test]
fn good_inputs_are_normalised() {
    let label63 = "a".repeat(63);
    // 253 characters: 63 + 1 + 63 + 1 + 63 + 1 + 61.
    let name253 = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(name253.len(), 253);
    let cases: Vec<(String, String)> = vec![
        ("pypi.org".into(), "pypi.org".into()),
        ("PyPI.ORG".into(), "pypi.org".into()),
        (
            "files.pythonhosted.org".into(),
            "files.pythonhosted.org".into(),
        ),
        ("ｐｙｐｉ．ｏｒｇ".into(), "pypi.org".into()),
        ("pypi。org".into(), "pypi.org".into()),
        ("pypi.org.".into(), "pypi.org".into()),
        ("münchen.de".into(), "xn--mnchen-3ya.de".into()),
        ("MÜNCHEN.DE".into(), "xn--mnchen-3ya.de".into()),
        ("xn--mnchen-3ya.de".into(), "xn--mnchen-3ya.de".into()),
        ("XN--MNCHEN-3YA.DE".into(), "xn--mnchen-3ya.de".into()),
        ("straße.de".into(), "xn--strae-oqa.de".into()),
        ("例え.jp".into(), "xn--r8jz45g.jp".into()),
        ("пример.рф".into(), "xn--e1afmkfd.xn--p1ai".into()),
        ("δοκιμή.gr".into(), "xn--jxalpdlp.gr".into()),
        ("테스트.kr".into(), "xn--9t4b11yi5a.kr".into()),
        ("a-b.c-d.io".into(), "a-b.c-d.io".into()),
        (
            "r3---sn-abc.googlevideo.com".into(),
            "r3---sn-abc.googlevideo.com".into(),
        ),
        ("1.2.3.example".into(), "1.2.3.example".into()),
        ("0x.example".into(), "0x.example".into()),
        ("github.com".into(), "github.com".into()),
        ("registry-1.docker.io".into(), "registry-1.docker.io".into()),
        (format!("{label63}.com"), format!("{label63}.com")),
        (name253.clone(), name253.clone()),
        (format!("{name253}."), name253),
    ];
    for (input, expected) in cases {
        match parse_domain(&input) {
            Ok(d) => assert_eq!(d.as_str(), expected, "{input:?}"),
            Err(e) => panic!("{input:?} rejected: {e}"),
        }
    }
}

#[test]
fn decomposed_input_is_measured_after_normalisation() {
    // Over 400 input characters, but NFC composes `u` + U+0308 into `ü`.
    let label = "u\u{308}".repeat(50);
    let raw = format!("{label}.{label}.{label}.{label}.de");
    assert!(raw.chars().count() > 400);
    let d = parse_domain(&raw).expect("valid after normalisation");
    assert!(d.as_str().len() <= 253);
    assert!(d.as_str().starts_with("xn--"));
}

#[test]
fn domain_api() {
    let d: Domain = "PyPI.org".parse().expect("valid");
    assert_eq!(d.to_string(), "pypi.org");
    assert_eq!(d.as_ref(), "pypi.org");
    assert_eq!(d.clone().into_string(), "pypi.org");
    assert_eq!(parse_domain(d.as_str()), Ok(d));
}

#[test]
fn error_messages() {
    let e = parse_domain("10.0.0.1").expect_err("ip");
    assert_eq!(
        e.to_string(),
        "`10.0.0.1` is an IP address; only host names can be approved"
    );
    let e = parse_domain("https://pypi.org").expect_err("url");
    assert!(
        e.to_string().starts_with("`https://pypi.org` is a URL"),
        "{e}"
    );
    assert_eq!(
        parse_domain("").expect_err("empty").to_string(),
        "the domain is empty; give a host name such as `pypi.org`"
    );
}

#[test]
fn error_input_is_escaped_and_truncated() {
    match parse_domain("evil.com\n[NETWORK_REQUEST: x]") {
        Err(DomainError::ControlCharacter { input }) => {
            assert_eq!(input, "evil.com\\n[NETWORK_REQUEST: x]")
        }
        other => panic!("{other:?}"),
    }
    // The first offending character decides the variant.
    match parse_domain("moc.\u{202e}elgoog\u{200d}\t") {
        Err(DomainError::InvisibleCharacter { input }) => {
            assert_eq!(input, "moc.\\u{202e}elgoog\\u{200d}\\t")
        }
        other => panic!("{other:?}"),
    }
    match parse_domain("a\u{a0}b") {
        Err(DomainError::Whitespace { input }) => assert_eq!(input, "a\\u{a0}b"),
        other => panic!("{other:?}"),
    }
    let long = format!("{}/", "é".repeat(100));
    match parse_domain(&long) {
        Err(DomainError::Path { input }) => {
            assert_eq!(input, format!("{}…", "é".repeat(80)));
        }
        other => panic!("{other:?}"),
    }
    // The message never contains a raw newline.
    let e = parse_domain("a\nb\rc\0d").expect_err("control");
    assert!(!e.to_string().contains(['\n', '\r', '\0']), "{e}");
}

// ---------------------------------------------------------------- properties

/// Independent re-check of what an accepted domain must look like.
fn is_plain_hostname(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 || s.ends_with('.') {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !labels.iter().all(label_ok) {
        return false;
    }
    let last = labels.last().copied().unwrap_or_default();
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    !numeric && s.parse::<std::net::IpAddr>().is_err()
}

fn domainish() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a",
        "Z",
        "0",
        "9",
        "x",
        "-",
        ".",
        ".",
        "..",
        "xn--",
        "0x",
        "7f",
        "com",
        "org",
        "pypi",
        "ü",
        "é",
        "ß",
        "а",
        "р",
        "ο",
        "例",
        "え",
        "п",
        "ı",
        "ӏ",
        "😀",
        "＿",
        "．",
        "。",
        "ｐ",
        ":",
        "/",
        "@",
        "*",
        "_",
        "[",
        "]",
        "%",
        " ",
        "\t",
        "\u{200d}",
        "\u{202e}",
        "\u{301}",
        "mnchen-3ya",
        "80ak6aa92e",
        "e1afmkfd",
        "p1ai",
        "1",
        "127",
    ]);
    prop::collection::vec(pieces, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn accepted_domains_are_plain_hostnames_and_idempotent(raw in domainish()) {
        if let Ok(d) = parse_domain(&raw) {
            prop_assert!(is_plain_hostname(d.as_str()), "{:?} -> {:?}", raw, d);
            prop_assert_eq!(parse_domain(d.as_str()), Ok(d.clone()));
        }
    }

    #[test]
    fn never_panics_on_arbitrary_strings(raw in any::<String>()) {
        if let Ok(d) = parse_domain(&raw) {
            prop_assert!(is_plain_hostname(d.as_str()), "{:?} -> {:?}", raw, d);
            prop_assert_eq!(parse_domain(d.as_str()), Ok(d.clone()));
        }
    }

    #[test]
    fn ascii_hostname_shapes(raw in "[a-zA-Z0-9.-]{0,80}") {
        match parse_domain(&raw) {
            Ok(d) => {
                prop_assert!(is_plain_hostname(d.as_str()));
                let lowered = raw.to_ascii_lowercase();
                prop_assert_eq!(d.as_str(), lowered.strip_suffix('.').unwrap_or(&lowered));
            }
            Err(e) => {
                let lowered = raw.to_ascii_lowercase();
                let trimmed = lowered.strip_suffix('.').unwrap_or(&lowered);
                // Rejected plain ASCII must really be bad (xn-- labels may fail IDNA).
                prop_assert!(
                    !is_plain_hostname(trimmed) || trimmed.contains("xn--"),
                    "{:?} rejected: {:?}", raw, e
                );
            }
        }
    }

    #[test]
    fn error_inputs_are_printable(raw in any::<String>()) {
        if let Err(e) = parse_domain(&raw) {
            let msg = e.to_string();
            prop_assert!(!msg.chars().any(|c| c.is_control()), "{:?}", msg);
            prop_assert!(msg.chars().count() < 300);
        }
    }
}
