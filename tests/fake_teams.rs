//! The fake Teams (issuer, token endpoint, Connector) checked against the wire format it
//! fakes (`shared/reference/wire-formats.md` §3), so the adapter's tests rest on it.

mod support;

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use support::teams::{FakeTeams, KeyChoice, ISSUER};

async fn bot_token(fake: &FakeTeams, http: &reqwest::Client) -> String {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("client_id", &fake.app_id())
        .append_pair("client_secret", &fake.app_password())
        .append_pair("scope", "https://api.botframework.com/.default")
        .finish();
    let answer: Value = http
        .post(fake.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 3600);
    answer["access_token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn the_issuer_publishes_metadata_and_endorsed_keys_that_verify_its_tokens() {
    let fake = FakeTeams::start().await;
    let http = reqwest::Client::new();
    let metadata: Value = http
        .get(fake.metadata_url())
        .send()
        .await
        .expect("metadata")
        .json()
        .await
        .expect("json");
    assert_eq!(metadata["issuer"], ISSUER);
    assert_eq!(
        metadata["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    let jwks: Value = http
        .get(metadata["jwks_uri"].as_str().expect("jwks_uri"))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2, "the rotated key is not published yet");
    assert!(keys[0]["endorsements"]
        .as_array()
        .expect("endorsements")
        .contains(&json!("msteams")));
    assert!(!keys[1]["endorsements"]
        .as_array()
        .expect("endorsements")
        .contains(&json!("msteams")));
    for key in keys {
        assert_eq!(key["kty"], "RSA");
        assert_eq!(key["e"], "AQAB");
    }
    // A valid token verifies with the published key and carries the claims of §3.2.
    let token = fake.valid_token();
    let header = jsonwebtoken::decode_header(&token).expect("header");
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid, header.x5t);
    let key = keys
        .iter()
        .find(|k| Some(k["kid"].as_str().unwrap_or_default()) == header.kid.as_deref())
        .expect("published");
    let decoding = DecodingKey::from_rsa_components(
        key["n"].as_str().expect("n"),
        key["e"].as_str().expect("e"),
    )
    .expect("key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[fake.app_id()]);
    validation.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &decoding, &validation)
        .expect("valid")
        .claims;
    assert_eq!(claims["serviceurl"], fake.service_url());
    // A tampered signature does not verify; the unpublished key is not in the set.
    let mut spec = fake.token_spec();
    spec.tamper = true;
    assert!(jsonwebtoken::decode::<Value>(&spec.sign(), &decoding, &validation).is_err());
    spec.tamper = false;
    spec.key = KeyChoice::Unpublished;
    let kid = jsonwebtoken::decode_header(spec.sign())
        .expect("header")
        .kid;
    assert!(keys.iter().all(|k| k["kid"].as_str() != kid.as_deref()));
    fake.publish_rotated_key();
    let jwks: Value = http
        .get(metadata["jwks_uri"].as_str().expect("jwks_uri"))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(3));
    assert_eq!(fake.key_fetches(), (1, 2));
    fake.stop().await;
}

#[tokio::test]
async fn the_token_endpoint_wants_the_client_credentials_of_the_bot() {
    let fake = FakeTeams::start().await;
    let http = reqwest::Client::new();
    let token = bot_token(&fake, &http).await;
    assert!(!token.is_empty());
    let wrong = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("client_id", &fake.app_id())
        .append_pair("client_secret", "nope")
        .append_pair("scope", "https://api.botframework.com/.default")
        .finish();
    let response = http
        .post(fake.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(wrong)
        .send()
        .await
        .expect("token");
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "invalid_client");
    fake.stop().await;
}

#[tokio::test]
async fn the_connector_keeps_threads_checks_its_inputs_and_throttles_on_demand() {
    let fake = FakeTeams::start().await;
    let http = reqwest::Client::new();
    let token = bot_token(&fake, &http).await;
    let channel = fake.add_channel();
    let base = fake.service_url();
    let call = |method: reqwest::Method, path: String, body: Option<Value>, auth: bool| {
        let http = http.clone();
        let token = token.clone();
        let url = format!("{base}{path}");
        async move {
            let mut request = http.request(method, url);
            if auth {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.expect("answer");
            let status = response.status().as_u16();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body, retry)
        }
    };
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();

    // A new thread in the channel.
    let params = json!({"isGroup":true,"channelData":{"channel":{"id":channel}},
                        "activity":{"type":"message","text":"anchor"}});
    let (status, created, _) = call(
        reqwest::Method::POST,
        "v3/conversations".into(),
        Some(params.clone()),
        true,
    )
    .await;
    assert_eq!(status, 201);
    let root = created["activityId"]
        .as_str()
        .expect("activityId")
        .to_owned();
    assert_eq!(created["id"], format!("{channel};messageid={root}"));
    assert_eq!(created["serviceUrl"], base);
    // Without a token, or with the id unencoded, or too big: refused.
    let (status, _, _) = call(
        reqwest::Method::POST,
        "v3/conversations".into(),
        Some(params),
        false,
    )
    .await;
    assert_eq!(status, 401);
    let thread = format!("{channel};messageid={root}");
    let (status, body, _) = call(
        reqwest::Method::POST,
        format!("v3/conversations/{thread}/activities/{root}"),
        Some(json!({"type":"message","text":"x"})),
        true,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BadArgument"))
    );
    let big = "x".repeat(30_000);
    let (status, body, _) = call(
        reqwest::Method::POST,
        format!("v3/conversations/{}/activities/{root}", enc(&thread)),
        Some(json!({"type":"message","text":big})),
        true,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("MessageSizeTooBig"))
    );
    // A reply and an update are kept as the thread's state.
    let (status, reply, _) = call(
        reqwest::Method::POST,
        format!("v3/conversations/{}/activities/{root}", enc(&thread)),
        Some(json!({"type":"message","text":"first"})),
        true,
    )
    .await;
    assert_eq!(status, 201);
    let reply_id = reply["id"].as_str().expect("id").to_owned();
    let (status, _, _) = call(
        reqwest::Method::PUT,
        format!("v3/conversations/{}/activities/{reply_id}", enc(&thread)),
        Some(json!({"type":"message","id":reply_id,"text":"second"})),
        true,
    )
    .await;
    assert_eq!(status, 200);
    let messages = fake.thread(&channel, Some(&root));
    let texts: Vec<_> = messages
        .iter()
        .map(|m| m.text.clone().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["anchor", "second"]);
    assert_eq!(messages[1].updates, 1);
    // Unknown conversations and messages.
    let (status, body, _) = call(
        reqwest::Method::PUT,
        format!("v3/conversations/{}/activities/999", enc(&thread)),
        Some(json!({"type":"message","text":"x"})),
        true,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NotFound"))
    );
    let (status, body, _) = call(
        reqwest::Method::POST,
        format!(
            "v3/conversations/{}/activities",
            enc("19:nope@thread.tacv2")
        ),
        Some(json!({"type":"message","text":"x"})),
        true,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("ConversationNotFound"))
    );
    // Injected throttling comes first, with Retry-After.
    fake.fail_next(429, Some(2));
    let (status, body, retry) = call(
        reqwest::Method::POST,
        format!("v3/conversations/{}/activities/{root}", enc(&thread)),
        Some(json!({"type":"message","text":"later"})),
        true,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str(), retry.as_deref()),
        (429, Some("Throttled"), Some("2"))
    );
    let ops: HashSet<&str> = fake
        .requests()
        .iter()
        .map(|r| r.op)
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    assert!(
        ops.contains("create")
            && ops.contains("reply")
            && ops.contains("update")
            && ops.contains("token")
    );
    // User messages are part of the state too.
    let olo = fake.user("Olo");
    let activity = fake.thread_reply(&channel, &root, &olo, "hello", true);
    assert_eq!(activity["conversation"]["id"], thread);
    assert_eq!(activity["text"], "<at>ApprovalBot</at> hello");
    assert_eq!(activity["entities"][0]["mentioned"]["id"], fake.bot_id());
    assert_eq!(fake.thread(&channel, Some(&root)).len(), 3);
    fake.stop().await;
}
