//! The HTTP surface over real sockets: health, metrics, rate limiting, the callback route.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::{settings, TcpProxy, TestApp, TestDatabase};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn health(app: &TestApp) -> (StatusCode, Value) {
    let response = client()
        .get(app.url("/health"))
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("JSON body"))
}

#[tokio::test]
async fn health_is_200_with_a_database_and_503_without() {
    let db = TestDatabase::postgres().await;
    let pg: SocketAddr = "127.0.0.1:5432".parse().expect("addr");
    let proxy = TcpProxy::start(pg).await;
    let mut url = url::Url::parse(&db.url).expect("url");
    url.set_port(Some(proxy.addr.port())).expect("port");
    let app = TestApp::start(settings(url.as_str(), &[])).await;

    let (status, body) = health(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["components"]["database"]["status"], "up");
    assert_eq!(
        body["status"], "degraded",
        "chat, VM and firewall are unreachable: {body}"
    );

    proxy.cut();
    let (status, body) = health(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["components"]["database"]["status"], "down");
    assert!(body["components"]["database"]["detail"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));

    proxy.restore().await;
    let mut recovered = false;
    for _ in 0..50 {
        if health(&app).await.0 == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "health recovers when the database is back");
    app.stop().await;
}

#[tokio::test]
async fn health_lists_unreachable_components_as_down() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(&db.url, &[])).await;
    let mut body = Value::Null;
    for _ in 0..100 {
        body = health(&app).await.1;
        let all_checked = ["mattermost", "vm", "firewall"].iter().all(|c| {
            body["components"][c]["status"] != "unknown" && !body["components"][c].is_null()
        });
        if all_checked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for component in ["mattermost", "vm", "firewall"] {
        assert_eq!(
            body["components"][component]["status"], "down",
            "{component}: {body}"
        );
    }
    assert_eq!(body["components"]["database"]["status"], "up");
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(&db.url, &[])).await;
    client()
        .get(app.url("/health"))
        .send()
        .await
        .expect("request");
    client()
        .get(app.url("/nope"))
        .send()
        .await
        .expect("request");
    let response = client()
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("body");

    // Every sample line is `name{labels} value`, with a Prometheus-legal name.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name: String = line
            .chars()
            .take_while(|c| *c != '{' && *c != ' ')
            .collect();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        let value = line.rsplit(' ').next().expect("value");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line:?}"
        );
    }
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let requests: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "session_manager_http_requests_total")
        .collect();
    assert!(
        requests
            .iter()
            .any(|s| s.labels.get("route") == Some("/health")
                && s.labels.get("status") == Some("200")),
        "{text}"
    );
    assert!(
        requests
            .iter()
            .any(|s| s.labels.get("route") == Some("unmatched")
                && s.labels.get("status") == Some("404")),
        "{text}"
    );
    for name in [
        "session_manager_build_info",
        "session_manager_component_up",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == name),
            "{name} missing from\n{text}"
        );
    }
    assert!(
        scrape.samples.iter().any(|s| s.metric == "session_manager_http_request_duration_seconds"
            && matches!(&s.value, prometheus_parse::Value::Histogram(buckets) if buckets.len() > 5)),
        "request durations are a histogram with buckets:\n{text}"
    );
    assert!(
        scrape
            .docs
            .contains_key("session_manager_http_requests_total"),
        "HELP text present"
    );
    app.stop().await;
}

#[tokio::test]
async fn rate_limiter_answers_429_past_the_burst_and_ignores_spoofed_forwarded_for() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(
        &db.url,
        &[("rate-limit-rps", "1"), ("rate-limit-burst", "5")],
    ))
    .await;
    let c = client();
    for i in 0..5 {
        let r = c
            .get(app.url("/health"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .expect("request");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "request {i} is within the burst"
        );
    }
    // A fresh X-Forwarded-For from an untrusted peer does not get a fresh bucket.
    let r = c
        .get(app.url("/health"))
        .header("x-forwarded-for", "203.0.113.200")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = r.json().await.expect("JSON");
    assert_eq!(body["error"], "rate limited");
    // Every route is limited, unknown ones too.
    for path in ["/metrics", "/does-not-exist"] {
        let r = c.get(app.url(path)).send().await.expect("request");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
    }
    let r = c
        .post(app.url("/callback"))
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "/callback");
    app.stop().await;
}

#[tokio::test]
async fn trusted_proxies_get_one_bucket_per_forwarded_client() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(
        &db.url,
        &[
            ("rate-limit-rps", "1"),
            ("rate-limit-burst", "2"),
            ("trusted-proxies", "127.0.0.1/32"),
        ],
    ))
    .await;
    let c = client();
    for i in 0..10 {
        let r = c
            .get(app.url("/health"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::OK, "client {i} has its own bucket");
    }
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = c
            .get(app.url("/health"))
            .header("x-forwarded-for", "198.51.100.50")
            .send()
            .await
            .expect("request");
        statuses.push(r.status());
    }
    assert_eq!(
        statuses,
        vec![
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "one forwarded client is still limited"
    );
    app.stop().await;
}

#[tokio::test]
async fn callback_rejects_malformed_bodies_with_a_reason() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(&db.url, &[])).await;
    let c = client();
    for (body, expected) in [
        ("not json", "invalid callback body"),
        ("{}", "user_id"),
        (r#"{"user_id":"u","post_id":5}"#, "post_id: invalid type"),
    ] {
        let r = c
            .post(app.url("/callback"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let json: Value = r.json().await.expect("JSON error");
        assert!(
            json["error"].as_str().is_some_and(|e| e.contains(expected)),
            "{body}: {json}"
        );
    }
    let oversized = "x".repeat(session_manager::http::MAX_BODY_BYTES + 1);
    let r = c
        .post(app.url("/callback"))
        .body(oversized)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = c.get(app.url("/callback")).send().await.expect("request");
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    app.stop().await;
}

#[tokio::test]
async fn chat_servers_can_have_a_port_of_their_own() {
    let db = TestDatabase::sqlite();
    let main = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let callback = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (main_addr, callback_addr) = (
        main.local_addr().expect("addr"),
        callback.local_addr().expect("addr"),
    );
    support::init_test_tracing();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(session_manager::serve(
        settings(&db.url, &[]),
        session_manager::Listeners {
            main,
            callback: Some(callback),
        },
        shutdown.clone(),
    ));
    let c = client();
    let status = |addr: SocketAddr, method: &'static str, path: &'static str| {
        let c = c.clone();
        async move {
            let url = format!("http://{addr}{path}");
            let request = match method {
                "GET" => c.get(url),
                _ => c
                    .post(url)
                    .header("content-type", "application/json")
                    .body("{}"),
            };
            request.send().await.expect("request").status()
        }
    };
    // Wait until both listen and answer.
    let mut up = false;
    for _ in 0..100 {
        if status(main_addr, "GET", "/health").await == StatusCode::OK {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the operations port answers /health");
    assert_eq!(status(main_addr, "GET", "/metrics").await, StatusCode::OK);
    assert_eq!(
        status(main_addr, "POST", "/callback").await,
        StatusCode::NOT_FOUND,
        "no callbacks on the operations port"
    );
    assert_eq!(
        status(callback_addr, "POST", "/callback").await,
        StatusCode::BAD_REQUEST,
        "the callback port takes (and checks) callbacks"
    );
    for path in ["/health", "/metrics"] {
        assert_eq!(
            status(callback_addr, "GET", path).await,
            StatusCode::NOT_FOUND,
            "{path} is not on the chat servers' port"
        );
    }
    shutdown.cancel();
    served
        .await
        .expect("serve task")
        .expect("serve stopped cleanly");
}

#[tokio::test]
async fn every_listed_endpoint_is_routed_and_nothing_else_is() {
    let db = TestDatabase::sqlite();
    // With Teams configured, so that its messaging endpoint is served too (nothing is reached).
    let app = TestApp::start(settings(
        &db.url,
        &[
            ("teams-app-id", "00000000-0000-0000-0000-000000000001"),
            ("teams-app-password", "test-password"),
            ("teams-token-url", "http://127.0.0.1:1/token"),
            ("teams-openid-metadata-url", "http://127.0.0.1:1/openid"),
        ],
    ))
    .await;
    for (method, path) in session_manager::http::ENDPOINTS {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = client()
            .request(method.clone(), app.url(path))
            .send()
            .await
            .expect("request");
        assert_ne!(
            response.status(),
            StatusCode::NOT_FOUND,
            "{method} {path} is listed in http::ENDPOINTS but not routed"
        );
    }
    let unknown = client()
        .get(app.url("/no-such-route"))
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

/// The JSON block of `docs/operations.md` that follows its `/health` heading.
fn runbook_health_sample() -> Value {
    let runbook = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .expect("runbook");
    let section = &runbook[runbook
        .find("### 2.1 `/health`")
        .expect("the /health section")..];
    let start = section.find("```json\n").expect("a JSON sample") + "```json\n".len();
    let end = start + section[start..].find("```").expect("its end");
    serde_json::from_str(&section[start..end]).expect("the sample is JSON")
}

/// Object keys, recursively (`a.b` for nested ones); component names are kept as keys.
fn shape(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, inner) in map {
            let path = format!("{prefix}{key}");
            out.push(path.clone());
            shape(inner, &format!("{path}."), out);
        }
    }
    out.sort();
}

#[tokio::test]
async fn the_runbooks_sample_health_answer_has_the_real_shape() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(&db.url, &[])).await;
    // Every component has reported once (the unreachable ones are down, with a detail).
    let mut body = Value::Null;
    for _ in 0..200 {
        body = health(&app).await.1;
        let components = body["components"].as_object().cloned().unwrap_or_default();
        if components.len() == 4 && components.values().all(|c| c["status"] != "unknown") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut real, mut documented) = (Vec::new(), Vec::new());
    shape(&body, "", &mut real);
    shape(&runbook_health_sample(), "", &mut documented);
    assert_eq!(
        documented, real,
        "docs/operations.md's sample /health answer (section 2.1) has another shape than /health: {body}"
    );
    app.stop().await;
}
