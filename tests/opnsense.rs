//! The OPNsense client against the fake firewall, and the fake's conformance to the wire
//! format in `shared/reference/wire-formats.md` §2 (checked with raw HTTP).

mod support;

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use secrecy::SecretString;
use serde_json::{json, Value};
use session_manager::config::FirewallSettings;
use session_manager::firewall::opnsense::{FirewallError, OpnsenseClient};
use support::opnsense::{
    Failure, FakeOpnsense, ALIAS, ALIAS_DESCRIPTION, INITIAL_DOMAIN, OTHER_ALIAS, OTHER_DESCRIPTION,
};

const KEY: &str = "w86XNZob/8Oq8aC5r0kbNarNtdpoQU781fyoeaOBQsBwkXUt";
const SECRET: &str = "XeD26XVrJ5ilAc/EmglCRC+0j2e57tRsjHwFepOseySWLM53";

fn config(fake: &FakeOpnsense, alias: &str, secret: &str, timeout: Duration) -> FirewallSettings {
    FirewallSettings {
        lease: std::time::Duration::from_secs(300),
        url: Some(url::Url::parse(&fake.url()).expect("fake URL")),
        key: Some(SecretString::from(KEY.to_owned())),
        secret: Some(SecretString::from(secret.to_owned())),
        alias: alias.to_owned(),
        verify_tls: true,
        timeout,
    }
}

fn client(fake: &FakeOpnsense) -> OpnsenseClient {
    OpnsenseClient::new(&config(fake, ALIAS, SECRET, Duration::from_secs(5))).expect("client")
}

fn domains(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Requests the fake saw after the first `skip`, as (method, path-suffix after
/// `/api/firewall/alias/`, body).
fn calls_since(fake: &FakeOpnsense, skip: usize) -> Vec<(String, String, Value)> {
    fake.requests()
        .into_iter()
        .skip(skip)
        .map(|(m, p, b)| {
            let action = p
                .strip_prefix("/api/firewall/alias/")
                .unwrap_or(&p)
                .to_owned();
            (m, action, b)
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn alias_uuid_is_looked_up_by_name_and_unknown_names_are_not_found() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let uuid = client(&fake).alias_uuid().await.expect("uuid");
    assert_eq!(Some(uuid.clone()), fake.alias_uuid(ALIAS));
    let (method, path, _) = fake.requests().pop().expect("a request");
    assert_eq!(method, "GET");
    assert_eq!(path, format!("/api/firewall/alias/getAliasUUID/{ALIAS}"));

    let missing = OpnsenseClient::new(&config(
        &fake,
        "no_such_alias",
        SECRET,
        Duration::from_secs(5),
    ))
    .expect("client");
    let err = missing.alias_uuid().await.expect_err("unknown alias");
    assert!(
        matches!(&err, FirewallError::AliasNotFound { alias } if alias == "no_such_alias"),
        "{err:?}"
    );
    assert!(err.is_permanent());
    let err = missing
        .check()
        .await
        .expect_err("check of an unknown alias");
    assert!(
        matches!(err, FirewallError::AliasNotFound { .. }),
        "{err:?}"
    );
    fake.stop().await;
}

#[tokio::test]
async fn alias_names_are_percent_encoded_as_one_path_segment() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let odd = OpnsenseClient::new(&config(&fake, "a/b?c", SECRET, Duration::from_secs(5)))
        .expect("client");
    let err = odd.alias_uuid().await.expect_err("no such alias");
    assert!(
        matches!(err, FirewallError::AliasNotFound { .. }),
        "{err:?}"
    );
    let (_, path, _) = fake.requests().pop().expect("a request");
    assert_eq!(path, "/api/firewall/alias/getAliasUUID/a%2Fb%3Fc");
    fake.stop().await;
}

#[tokio::test]
async fn entries_are_the_selected_keys_only() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);
    let uuid = client.alias_uuid().await.expect("uuid");

    // getItem lists llm_approved_domains and other_alias with selected:0 as well.
    let raw = raw_get(&fake, &format!("getItem/{uuid}")).await;
    let content = &raw["alias"]["content"];
    assert_eq!(content[OTHER_ALIAS]["selected"], json!(0));
    assert_eq!(content[ALIAS]["selected"], json!(0));
    assert_eq!(
        client.alias_entries(&uuid).await.expect("entries"),
        vec![INITIAL_DOMAIN]
    );

    // Several entries come back in their saved order.
    fake.set_content(ALIAS, &["z.example", "a.example", OTHER_ALIAS]);
    assert_eq!(
        client.alias_entries(&uuid).await.expect("entries"),
        vec!["z.example", "a.example", OTHER_ALIAS]
    );

    // Empty content is the key "" with selected:1, which is not an entry.
    fake.set_content(ALIAS, &[]);
    let raw = raw_get(&fake, &format!("getItem/{uuid}")).await;
    assert_eq!(
        raw["alias"]["content"][""],
        json!({"value": "", "selected": 1})
    );
    assert!(client
        .alias_entries(&uuid)
        .await
        .expect("entries")
        .is_empty());
    fake.stop().await;
}

#[tokio::test]
async fn entries_of_an_unknown_uuid_are_not_found() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let err = client(&fake)
        .alias_entries("8d1a0a4f-3b8e-4d5e-9c3a-0f6a2b1c4d5e")
        .await
        .expect_err("unknown uuid");
    assert!(
        matches!(err, FirewallError::AliasNotFound { .. }),
        "{err:?}"
    );
    fake.stop().await;
}

#[tokio::test]
async fn ensure_domains_adds_only_missing_ones_saves_and_applies() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);
    let uuid = fake.alias_uuid(ALIAS).expect("alias");
    let added = client
        .ensure_domains(&domains(&[
            INITIAL_DOMAIN,
            "pypi.org",
            "files.pythonhosted.org",
            "PyPI.org",
        ]))
        .await
        .expect("ensure");
    assert_eq!(added, vec!["pypi.org", "files.pythonhosted.org"]);
    let expected = vec![INITIAL_DOMAIN, "pypi.org", "files.pythonhosted.org"];
    assert_eq!(fake.alias_content(ALIAS), expected);
    assert_eq!(fake.applied_content(ALIAS), expected);
    assert_eq!(fake.reconfigure_count(), 1);
    // The other alias is untouched.
    assert_eq!(fake.alias_content(OTHER_ALIAS), vec!["192.168.1.0/24"]);

    let calls = calls_since(&fake, 0);
    let summary: Vec<String> = calls.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert_eq!(
        summary,
        vec![
            format!("GET getAliasUUID/{ALIAS}"),
            format!("GET getItem/{uuid}"),
            format!("POST setItem/{uuid}"),
            "POST reconfigure".to_owned(),
        ]
    );
    assert_eq!(
        calls[2].2,
        json!({"alias": {"content": "api.anthropic.com\npypi.org\nfiles.pythonhosted.org"}})
    );
    assert_eq!(calls[3].2, json!({}));
    fake.stop().await;
}

#[tokio::test]
async fn ensure_domains_is_idempotent_but_always_reconfigures() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);
    let first = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect("first");
    assert_eq!(first, vec!["pypi.org"]);
    let seen = fake.requests().len();
    let second = client
        .ensure_domains(&domains(&["pypi.org", INITIAL_DOMAIN]))
        .await
        .expect("second");
    assert!(second.is_empty(), "{second:?}");
    let calls = calls_since(&fake, seen);
    assert!(
        calls.iter().all(|(_, p, _)| !p.starts_with("setItem")),
        "nothing to save, yet: {calls:?}"
    );
    assert_eq!(calls.last().map(|c| c.1.as_str()), Some("reconfigure"));
    assert_eq!(fake.reconfigure_count(), 2);
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN, "pypi.org"]);

    // An empty list still reconfigures.
    assert!(client.ensure_domains(&[]).await.expect("empty").is_empty());
    assert_eq!(fake.reconfigure_count(), 3);
    fake.stop().await;
}

#[tokio::test]
async fn a_validation_failure_is_permanent_and_keeps_the_messages() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);

    // Injected, for a name the fake would accept.
    fake.fail_next("setItem", 1, Failure::Validation);
    let err = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect_err("validation");
    match &err {
        FirewallError::Validation { messages } => assert_eq!(
            messages,
            &vec!["Entry \"pypi.org\" is not a valid hostname, IP address or range.".to_owned()]
        ),
        other => panic!("{other:?}"),
    }
    assert!(err.is_permanent());
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN]);
    assert_eq!(fake.reconfigure_count(), 0);

    // The fake's own validateHost: a wildcard and an underscore, one message each.
    let err = client
        .ensure_domains(&domains(&["*.example.com", "bad_name.example"]))
        .await
        .expect_err("validation");
    match &err {
        FirewallError::Validation { messages } => assert_eq!(
            messages,
            &vec![
                "Entry \"*.example.com\" is not a valid hostname, IP address or range.".to_owned(),
                "Entry \"bad_name.example\" is not a valid hostname, IP address or range."
                    .to_owned(),
            ]
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN]);
    fake.stop().await;
}

#[tokio::test]
async fn entries_that_would_split_are_refused_before_any_request() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    for bad in ["a.example\nb.example", "", "a.example b.example"] {
        let err = client(&fake)
            .ensure_domains(&domains(&["ok.example", bad]))
            .await
            .expect_err("refused");
        assert!(matches!(err, FirewallError::Validation { .. }), "{err:?}");
    }
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    fake.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_a_permanent_auth_error() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let wrong = OpnsenseClient::new(&config(&fake, ALIAS, "wrong", Duration::from_secs(5)))
        .expect("client");
    let err = wrong
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect_err("401");
    match &err {
        FirewallError::Auth { status, message } => {
            assert_eq!(*status, 401);
            assert_eq!(message, "Authentication Failed");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_permanent());
    assert!(!format!("{err} {err:?}").contains(SECRET));

    fake.fail_next("getAliasUUID", 1, Failure::Status(403));
    let err = client(&fake).check().await.expect_err("403");
    assert!(
        matches!(&err, FirewallError::Auth { status: 403, message } if message == "Forbidden"),
        "{err:?}"
    );
    assert!(err.is_permanent());
    fake.stop().await;
}

#[tokio::test]
async fn server_errors_are_not_permanent() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);

    fake.fail_next("getAliasUUID", 1, Failure::Status(500));
    let err = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect_err("500");
    match &err {
        FirewallError::Server { status, message } => {
            assert_eq!(*status, 500);
            assert_eq!(message, "Unexpected error, check log for details");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_permanent());

    fake.fail_next("setItem", 1, Failure::Status(503));
    let err = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect_err("503");
    match &err {
        FirewallError::Server { status, message } => {
            assert_eq!(*status, 503);
            assert_eq!(message, "503 Service Unavailable");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_permanent());
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN]);

    // The failures are used up: the retry goes through.
    assert_eq!(
        client
            .ensure_domains(&domains(&["pypi.org"]))
            .await
            .expect("retry"),
        vec!["pypi.org"]
    );
    assert_eq!(
        fake.applied_content(ALIAS),
        vec![INITIAL_DOMAIN, "pypi.org"]
    );
    fake.stop().await;
}

#[tokio::test]
async fn a_timeout_is_unreachable_and_not_permanent() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = OpnsenseClient::new(&config(&fake, ALIAS, SECRET, Duration::from_millis(300)))
        .expect("client");
    fake.fail_next("setItem", 1, Failure::Timeout(Duration::from_secs(1)));
    let started = std::time::Instant::now();
    let err = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect_err("timeout");
    assert!(
        started.elapsed() < Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, FirewallError::Unreachable(_)), "{err:?}");
    assert!(!err.is_permanent());
    assert_eq!(fake.reconfigure_count(), 0);

    // The retry converges whether or not the slow save has landed yet.
    assert_eq!(
        client
            .ensure_domains(&domains(&["pypi.org"]))
            .await
            .expect("retry")
            .len(),
        1
    );
    assert_eq!(
        fake.applied_content(ALIAS),
        vec![INITIAL_DOMAIN, "pypi.org"]
    );
    // The slow request finishes on the fake's side; saving the same content twice is
    // harmless.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN, "pypi.org"]);
    fake.stop().await;
}

#[tokio::test]
async fn a_failed_reconfigure_is_retried_by_the_next_call() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);
    fake.fail_next("reconfigure", 1, Failure::ReconfigureFails);
    let err = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect_err("reconfigure fails");
    match &err {
        FirewallError::Reconfigure(message) => {
            assert!(message.starts_with("Alias: "), "{message}");
            assert!(message.contains(ALIAS), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_permanent());
    // Saved but not applied.
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN, "pypi.org"]);
    assert_eq!(fake.applied_content(ALIAS), vec![INITIAL_DOMAIN]);
    assert_eq!(fake.reconfigure_count(), 0);

    // The retry finds nothing to add, but must still apply.
    let added = client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect("retry");
    assert!(added.is_empty(), "{added:?}");
    assert_eq!(fake.reconfigure_count(), 1);
    assert_eq!(
        fake.applied_content(ALIAS),
        vec![INITIAL_DOMAIN, "pypi.org"]
    );
    fake.stop().await;
}

#[tokio::test]
async fn reconfigure_checks_the_status() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);
    client.reconfigure().await.expect("ok");
    assert_eq!(fake.reconfigure_count(), 1);
    fake.fail_next("reconfigure", 1, Failure::Status(500));
    let err = client.reconfigure().await.expect_err("500");
    assert!(matches!(err, FirewallError::Reconfigure(_)), "{err:?}");
    fake.fail_next("reconfigure", 1, Failure::Status(502));
    let err = client.reconfigure().await.expect_err("502");
    assert!(
        matches!(err, FirewallError::Server { status: 502, .. }),
        "{err:?}"
    );
    assert_eq!(fake.reconfigure_count(), 1);
    fake.stop().await;
}

#[tokio::test]
async fn every_post_carries_a_json_object() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client = client(&fake);
    client
        .ensure_domains(&domains(&["pypi.org"]))
        .await
        .expect("ensure");
    client.reconfigure().await.expect("reconfigure");
    let posts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|(m, _, _)| m == "POST")
        .collect();
    assert_eq!(posts.len(), 3, "{posts:?}");
    for (_, path, body) in &posts {
        assert!(body.is_object(), "{path}: {body:?}");
    }

    // What the guard protects against: OPNsense refuses an empty JSON POST.
    let response = raw(&fake, reqwest::Method::POST, "reconfigure")
        .header(CONTENT_TYPE, "application/json")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.text().await.expect("body"),
        r#"{"status":400,"message":"Invalid JSON syntax"}"#
    );
    fake.stop().await;
}

#[tokio::test]
async fn check_reports_a_firewall_that_is_down() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let client =
        OpnsenseClient::new(&config(&fake, ALIAS, SECRET, Duration::from_secs(2))).expect("client");
    client.check().await.expect("up");
    fake.set_down(true);
    // Twice: once over the pooled connection (503, closed), once over a new connection
    // (closed at accept).
    for _ in 0..2 {
        let err = client.check().await.expect_err("down");
        assert!(
            matches!(
                err,
                FirewallError::Unreachable(_) | FirewallError::Server { status: 503, .. }
            ),
            "{err:?}"
        );
        assert!(!err.is_permanent());
    }
    let err = client.check().await.expect_err("still down");
    assert!(matches!(err, FirewallError::Unreachable(_)), "{err:?}");
    fake.set_down(false);
    client.check().await.expect("up again");
    fake.stop().await;
}

#[tokio::test]
async fn an_unreachable_port_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let client = OpnsenseClient::new(&FirewallSettings {
        lease: std::time::Duration::from_secs(300),
        url: Some(url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("url")),
        key: Some(SecretString::from(KEY.to_owned())),
        secret: Some(SecretString::from(SECRET.to_owned())),
        alias: ALIAS.into(),
        verify_tls: false,
        timeout: Duration::from_secs(2),
    })
    .expect("client");
    let err = client.check().await.expect_err("refused");
    assert!(matches!(err, FirewallError::Unreachable(_)), "{err:?}");
    assert!(!err.is_permanent());
    assert!(!format!("{err} {err:?} {client:?}").contains(SECRET));
}

#[tokio::test]
async fn a_base_url_with_a_path_prefix_is_kept() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let mut cfg = config(&fake, ALIAS, SECRET, Duration::from_secs(5));
    cfg.url = Some(url::Url::parse(&format!("{}/prefix/", fake.url())).expect("url"));
    let err = OpnsenseClient::new(&cfg)
        .expect("client")
        .check()
        .await
        .expect_err("the fake has no prefix");
    // A wrong base URL shows up as the 404 of a missing endpoint, not as a missing alias.
    assert!(
        matches!(err, FirewallError::Server { status: 404, .. }),
        "{err:?}"
    );
    let (_, path, _) = fake.requests().pop().expect("a request");
    assert_eq!(
        path,
        format!("/prefix/api/firewall/alias/getAliasUUID/{ALIAS}")
    );
    fake.stop().await;
}

// ------------------------------------------------------------------------------------------
// Fake conformance, with raw HTTP
// ------------------------------------------------------------------------------------------

fn raw(fake: &FakeOpnsense, method: reqwest::Method, action: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(
            method,
            format!("{}/api/firewall/alias/{action}", fake.url()),
        )
        .basic_auth(KEY, Some(SECRET))
}

async fn raw_get(fake: &FakeOpnsense, action: &str) -> Value {
    let response = raw(fake, reqwest::Method::GET, action)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200, "{action}");
    response.json().await.expect("JSON")
}

async fn raw_post(fake: &FakeOpnsense, action: &str, body: &Value) -> (u16, String) {
    let response = raw(fake, reqwest::Method::POST, action)
        .json(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn fake_get_alias_uuid_answers_uuid_or_an_empty_array() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let uuid = fake.alias_uuid(ALIAS).expect("uuid");
    let response = raw(
        &fake,
        reqwest::Method::GET,
        &format!("getAliasUUID/{ALIAS}"),
    )
    .send()
    .await
    .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[CONTENT_TYPE],
        "application/json; charset=UTF-8"
    );
    assert_eq!(
        response.text().await.expect("body"),
        format!(r#"{{"uuid":"{uuid}"}}"#)
    );
    let response = raw(&fake, reqwest::Method::GET, "getAliasUUID/nope")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "[]");
    // PHP method names are case-insensitive and underscores are dropped.
    assert_eq!(
        raw_get(&fake, &format!("get_alias_u_u_i_d/{ALIAS}")).await,
        json!({"uuid": uuid})
    );
    fake.stop().await;
}

#[tokio::test]
async fn fake_get_item_has_the_model_shape_and_php_escaping() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let uuid = fake.alias_uuid(ALIAS).expect("uuid");
    let response = raw(&fake, reqwest::Method::GET, &format!("getItem/{uuid}"))
        .send()
        .await
        .expect("send");
    let text = response.text().await.expect("body");
    // `/` and non-ASCII escaped as PHP does.
    assert!(text.contains(r"allow-list \/ managed"), "{text}");
    assert!(text.contains(r"B\u00fcro 192.168.1.0\/24"), "{text}");
    // The content map, in order: the entry, then the alias picker.
    assert!(
        text.contains(&format!(
            r#""content":{{"api.anthropic.com":{{"value":"api.anthropic.com","selected":1}},"{ALIAS}":{{"selected":0,"value":"{ALIAS}","description":"#
        )),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text).expect("JSON");
    let alias = &body["alias"];
    assert_eq!(alias["name"], json!(ALIAS));
    assert_eq!(alias["enabled"], json!("1"));
    assert_eq!(alias["description"], json!(ALIAS_DESCRIPTION));
    assert_eq!(
        alias["type"]["host"],
        json!({"value": "Host(s)", "selected": 1})
    );
    assert_eq!(alias["type"]["network"]["selected"], json!(0));
    assert_eq!(alias["categories"], json!([]));
    assert_eq!(
        alias["content"],
        json!({
            INITIAL_DOMAIN: {"value": INITIAL_DOMAIN, "selected": 1},
            ALIAS: {"selected": 0, "value": ALIAS, "description": ALIAS_DESCRIPTION},
            OTHER_ALIAS: {"selected": 0, "value": OTHER_ALIAS, "description": OTHER_DESCRIPTION},
        })
    );
    fake.stop().await;
}

#[tokio::test]
async fn fake_get_item_of_an_unknown_uuid_has_only_the_alias_picker() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let body = raw_get(&fake, "getItem/8d1a0a4f-3b8e-4d5e-9c3a-0f6a2b1c4d5e").await;
    assert_eq!(
        body,
        json!({"alias": {"content": {
            ALIAS: {"selected": 0, "value": ALIAS, "description": ALIAS_DESCRIPTION},
            OTHER_ALIAS: {"selected": 0, "value": OTHER_ALIAS, "description": OTHER_DESCRIPTION},
        }}})
    );
    // Without a uuid: the defaults of a new alias.
    let body = raw_get(&fake, "getItem").await;
    assert_eq!(body["alias"]["name"], json!(""));
    assert_eq!(
        body["alias"]["content"][""],
        json!({"value": "", "selected": 1})
    );
    fake.stop().await;
}

#[tokio::test]
async fn fake_set_item_requires_post_and_the_alias_key() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let uuid = fake.alias_uuid(ALIAS).expect("uuid");
    let failed = r#"{"result":"failed"}"#;
    let response = raw(&fake, reqwest::Method::GET, &format!("setItem/{uuid}"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.text().await.expect("body"), failed);
    assert_eq!(
        raw_post(
            &fake,
            &format!("setItem/{uuid}"),
            &json!({"content": "x.example"})
        )
        .await,
        (200, failed.to_owned())
    );
    // A malformed unknown uuid cannot be upserted.
    assert_eq!(
        raw_post(
            &fake,
            "setItem/not-a-uuid",
            &json!({"alias": {"content": "x.example"}})
        )
        .await,
        (200, failed.to_owned())
    );
    // The uuid parameter is required.
    let (status, body) = raw_post(&fake, "setItem", &json!({"alias": {}})).await;
    assert_eq!(
        (status, body.as_str()),
        (404, r#"{"errorMessage":"Endpoint not found"}"#)
    );
    // An array where a value belongs is an exception.
    let (status, body) = raw_post(
        &fake,
        &format!("setItem/{uuid}"),
        &json!({"alias": {"content": ["a.example"]}}),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (
            500,
            r#"{"errorMessage":"Unexpected error, check log for details"}"#
        )
    );
    assert_eq!(fake.alias_content(ALIAS), vec![INITIAL_DOMAIN]);
    fake.stop().await;
}

#[tokio::test]
async fn fake_set_item_is_a_partial_update_that_only_reconfigure_applies() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let uuid = fake.alias_uuid(ALIAS).expect("uuid");
    assert_eq!(
        raw_post(
            &fake,
            &format!("setItem/{uuid}"),
            &json!({"alias": {"content": "a.example\nb.example"}})
        )
        .await,
        (200, r#"{"result":"saved"}"#.to_owned())
    );
    assert_eq!(fake.alias_content(ALIAS), vec!["a.example", "b.example"]);
    assert_eq!(fake.applied_content(ALIAS), vec![INITIAL_DOMAIN]);
    let item = raw_get(&fake, &format!("getItem/{uuid}")).await;
    assert_eq!(item["alias"]["name"], json!(ALIAS));
    assert_eq!(item["alias"]["description"], json!(ALIAS_DESCRIPTION));
    assert_eq!(item["alias"]["type"]["host"]["selected"], json!(1));

    // reconfigure: GET fails, POST {} applies.
    let response = raw(&fake, reqwest::Method::GET, "reconfigure")
        .send()
        .await
        .expect("send");
    assert_eq!(
        response.text().await.expect("body"),
        r#"{"status":"failed"}"#
    );
    assert_eq!(fake.applied_content(ALIAS), vec![INITIAL_DOMAIN]);
    assert_eq!(
        raw_post(&fake, "reconfigure", &json!({})).await,
        (200, r#"{"status":"ok"}"#.to_owned())
    );
    assert_eq!(fake.applied_content(ALIAS), vec!["a.example", "b.example"]);
    assert_eq!(fake.reconfigure_count(), 1);

    // A well-formed unknown uuid is an upsert.
    let new_uuid = "0c9f4a1e-2b3d-4e5f-8a6b-7c8d9e0f1a2b";
    assert_eq!(
        raw_post(
            &fake,
            &format!("setItem/{new_uuid}"),
            &json!({"alias": {"name": "fresh_alias", "type": "host", "content": "c.example"}})
        )
        .await,
        (200, r#"{"result":"saved"}"#.to_owned())
    );
    assert_eq!(fake.alias_uuid("fresh_alias").as_deref(), Some(new_uuid));
    fake.stop().await;
}

#[tokio::test]
async fn fake_set_item_validates_host_entries_like_opnsense() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let uuid = fake.alias_uuid(ALIAS).expect("uuid");
    let path = format!("setItem/{uuid}");
    for good in [
        "example.com",
        "localhost",
        "xn--mnchen-3ya.de",
        "bücher.de",
        "a-b.example",
        "10.0.0.1",
        "2001:db8::1",
        "10.0.0.1-10.0.0.9",
        "!10.0.0.5",
        OTHER_ALIAS,
        "1.example",
    ] {
        let (status, body) = raw_post(&fake, &path, &json!({"alias": {"content": good}})).await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"result":"saved"}"#),
            "{good}"
        );
    }
    for bad in [
        "*.example.com",
        "bad_name.example",
        "example.com.",
        "1.2.3",
        "123.example.456",
        "-a.example",
        "a-.example",
        "a..example",
        "10.0.0.1-nope",
        "ex ample.com",
    ] {
        let (status, body) = raw_post(&fake, &path, &json!({"alias": {"content": bad}})).await;
        assert_eq!(status, 200, "{bad}");
        let body: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            body,
            json!({"result": "failed", "validations": {"alias.content":
                format!("Entry \"{bad}\" is not a valid hostname, IP address or range.")}}),
            "{bad}"
        );
    }
    // Several messages for one field become a list; nothing is saved.
    let before = fake.alias_content(ALIAS);
    let (_, body) = raw_post(
        &fake,
        &path,
        &json!({"alias": {"content": "ok.example\n*.a.example\n_b.example"}}),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"result": "failed", "validations": {"alias.content": [
            "Entry \"*.a.example\" is not a valid hostname, IP address or range.",
            "Entry \"_b.example\" is not a valid hostname, IP address or range.",
        ]}})
    );
    assert_eq!(fake.alias_content(ALIAS), before);
    fake.stop().await;
}

#[tokio::test]
async fn fake_checks_basic_auth_after_routing() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    let url = format!("{}/api/firewall/alias/getAliasUUID/{ALIAS}", fake.url());
    let http = reqwest::Client::new();
    let response = http
        .get(&url)
        .basic_auth(KEY, Some("wrong"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()[CONTENT_TYPE],
        "application/json; charset=UTF-8"
    );
    assert_eq!(
        response.text().await.expect("body"),
        r#"{"status":401,"message":"Authentication Failed"}"#
    );
    let response = http.get(&url).send().await.expect("send");
    assert_eq!(response.status(), 401);
    // Routing comes first: an unknown endpoint is 404 even without valid credentials.
    let response = http
        .get(format!("{}/api/firewall/alias/noSuchAction", fake.url()))
        .basic_auth(KEY, Some("wrong"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()[CONTENT_TYPE],
        "application/json;charset=utf-8"
    );
    assert_eq!(
        response.text().await.expect("body"),
        r#"{"errorMessage":"Endpoint not found"}"#
    );
    for path in [
        "/api/firewall/alias_util/aliases",
        "/api/core/firmware/status",
        "/index.php",
    ] {
        let response = http
            .get(format!("{}{path}", fake.url()))
            .basic_auth(KEY, Some(SECRET))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 404, "{path}");
    }
    fake.stop().await;
}

#[tokio::test]
async fn fake_injected_failures_have_the_real_shapes_and_run_out() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    fake.fail_next("reconfigure", 2, Failure::ReconfigureFails);
    for _ in 0..2 {
        let (status, body) = raw_post(&fake, "reconfigure", &json!({})).await;
        assert_eq!(status, 500);
        let body: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["errorTitle"], json!("Alias"));
        assert_eq!(body["errorLevel"], json!("error"));
        assert!(body["errorMessage"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(fake.reconfigure_count(), 0);
    assert_eq!(
        raw_post(&fake, "reconfigure", &json!({})).await,
        (200, r#"{"status":"ok"}"#.to_owned())
    );

    fake.fail_next("getItem", 1, Failure::Status(500));
    let response = raw(&fake, reqwest::Method::GET, "getItem")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 500);
    assert_eq!(
        response.text().await.expect("body"),
        r#"{"errorMessage":"Unexpected error, check log for details"}"#
    );
    raw_get(&fake, "getItem").await;

    // Validation only fires on setItem, even when the path filter matches more.
    fake.fail_next("/api/", 1, Failure::Validation);
    raw_get(&fake, &format!("getAliasUUID/{ALIAS}")).await;
    let uuid = fake.alias_uuid(ALIAS).expect("uuid");
    let (_, body) = raw_post(
        &fake,
        &format!("setItem/{uuid}"),
        &json!({"alias": {"content": "api.anthropic.com\nnew.example"}}),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"result": "failed", "validations": {"alias.content":
            "Entry \"new.example\" is not a valid hostname, IP address or range."}})
    );
    fake.stop().await;
}

#[tokio::test]
async fn fake_records_requests_and_drops_connections_while_down() {
    let fake = FakeOpnsense::start(KEY, SECRET).await;
    raw_post(&fake, "reconfigure", &json!({})).await;
    let requests = fake.requests();
    assert_eq!(
        requests,
        vec![(
            "POST".to_owned(),
            "/api/firewall/alias/reconfigure".to_owned(),
            json!({})
        )]
    );
    fake.set_down(true);
    let err = reqwest::Client::new()
        .get(format!(
            "{}/api/firewall/alias/getAliasUUID/{ALIAS}",
            fake.url()
        ))
        .basic_auth(KEY, Some(SECRET))
        .send()
        .await
        .expect_err("connection closed");
    assert!(!err.is_status(), "{err:?}");
    fake.set_down(false);
    raw_get(&fake, &format!("getAliasUUID/{ALIAS}")).await;
    fake.stop().await;
}
