//! A client of the bot's web console, as a browser uses it: login, the session cookie, the
//! CSRF token from the page, JSON requests and the Server-Sent Events stream.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// One logged-in browser.
pub struct ConsoleClient {
    pub http: reqwest::Client,
    pub base: String,
    pub cookie: String,
    pub csrf: String,
}

/// A client that follows no redirects and keeps no cookies of its own.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// The `sm_console` cookie a response sets.
pub fn session_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("sm_console=") && !v.starts_with("sm_console=;"))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}

/// The CSRF token a page carries.
pub fn csrf_of(page: &str) -> Option<String> {
    let at = page.find("name=\"csrf-token\" content=\"")?;
    let rest = &page[at + "name=\"csrf-token\" content=\"".len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

impl ConsoleClient {
    /// Logs in with `token` at `base` (`http://127.0.0.1:port`); the status when refused.
    pub async fn login(base: &str, token: &str) -> Result<Self, StatusCode> {
        let http = plain_client();
        let response = http
            .get(format!("{base}/console/login"))
            .query(&[("token", token)])
            .send()
            .await
            .expect("login request");
        let Some(cookie) = session_cookie(&response) else {
            return Err(response.status());
        };
        assert_eq!(
            response.status(),
            StatusCode::SEE_OTHER,
            "a login redirects"
        );
        let page = http
            .get(format!("{base}/"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("index")
            .text()
            .await
            .expect("body");
        let csrf = csrf_of(&page).unwrap_or_else(|| panic!("no CSRF token in {page}"));
        Ok(Self {
            http,
            base: base.to_owned(),
            cookie,
            csrf,
        })
    }

    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .expect("get");
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    /// `POST path` with a JSON body, the cookie and the CSRF token: status and JSON answer.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("x-csrf-token", &self.csrf)
            .json(&body)
            .send()
            .await
            .expect("post");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Writes `text` in a session's thread (`POST /console/api/sessions/{id}/messages`).
    pub async fn say(&self, session: &str, text: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/console/api/sessions/{session}/messages"),
            serde_json::json!({ "text": text }),
        )
        .await
    }

    /// A session's button (`POST /console/api/sessions/{id}/commands/{command}`).
    pub async fn command(&self, session: &str, command: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/console/api/sessions/{session}/commands/{command}"),
            serde_json::json!({}),
        )
        .await
    }

    /// A card's button (`POST /console/api/cards/{post}/{action}`).
    pub async fn click(&self, post: &str, action: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/console/api/cards/{post}/{action}"),
            serde_json::json!({}),
        )
        .await
    }

    /// A session's event stream, from `last_event_id` when given (as a reconnecting browser).
    pub async fn events(&self, session: &str, last_event_id: Option<i64>) -> EventStream {
        let mut request = self
            .http
            .get(format!("{}/console/sessions/{session}/events", self.base))
            .header("cookie", &self.cookie)
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("events");
        assert_eq!(response.status(), StatusCode::OK, "the event stream opens");
        EventStream {
            response,
            buffer: String::new(),
            seen: Vec::new(),
        }
    }
}

/// A Server-Sent Events stream of `entry` events.
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
    /// Every entry received so far, in order.
    pub seen: Vec<Value>,
}

impl EventStream {
    /// The next entry, or `None` when nothing came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = "message";
                let mut data = String::new();
                let mut id = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = if v.trim() == "entry" {
                            "entry"
                        } else {
                            "other"
                        };
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<i64>().ok();
                    }
                }
                if event != "entry" {
                    continue; // keep-alive comments
                }
                let entry: Value = serde_json::from_str(&data).expect("entry JSON");
                assert_eq!(entry["id"].as_i64(), id, "the SSE id is the entry's");
                self.seen.push(entry.clone());
                return Some(entry);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Reads entries until one satisfies `check` (panics after `wait` with what came).
    pub async fn until(
        &mut self,
        what: &str,
        wait: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(entry) if check(&entry) => return entry,
                Some(_) => {}
                None => panic!(
                    "no {what} within {wait:?}; entries: {}",
                    self.seen
                        .iter()
                        .map(|e| format!(
                            "{} {} {}",
                            e["id"],
                            e["kind"],
                            e["body"]["text"]
                                .as_str()
                                .or(e["body"]["title"].as_str())
                                .unwrap_or_default()
                        ))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }
}

/// The text of an entry (a post's or message's text, a card's title and text).
pub fn text_of(entry: &Value) -> String {
    let body = &entry["body"];
    format!(
        "{} {}",
        body["title"].as_str().unwrap_or_default(),
        body["text"].as_str().unwrap_or_default()
    )
}
