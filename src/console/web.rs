//! The console's routes: pages, the event stream and the requests a page sends.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the sessions the viewer may see, and a form to start one |
//! | `GET /console/sessions/{id}` | a session's page |
//! | `GET /console/sessions/{id}/events` | its thread as Server-Sent Events, from `Last-Event-ID` (or `?after=`) |
//! | `POST /console/api/sessions` | start a session (`{repo, branch?, worktree?, profile?}`) |
//! | `POST /console/api/sessions/{id}/messages` | write to it (`{text}`) |
//! | `POST /console/api/sessions/{id}/commands/{command}` | `stop`, `compact`, `clear`, `restart`, `interrupt` |
//! | `POST /console/api/cards/{post}/{action}` | a card's button |
//! | `GET /console/login?token=…`, `POST /console/login`, `POST /console/logout` | logins |
//! | `GET /console/t/{post}` | the session of a thread (the console's permalinks) |
//! | `GET /console/static/{file}` | the script and the style sheet |
//!
//! Every `POST` needs the login's CSRF token in `X-CSRF-Token`. Who may see and do what is
//! [`crate::access`], with the viewer's id on the session's platform: messages and commands
//! go through that platform's dispatcher as if written in the thread (so the same rules, the
//! same answers), and card buttons through the same click handler as chat's buttons.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::auth::{self, Auth, Refusal, Viewer};
use super::platform::{ConsoleChat, LOBBY};
use super::transcript::{public_body, Transcript};
use crate::access::{Act, Role, Roles};
use crate::chat::router::ChatRouter;
use crate::chat::{
    CardClick, ChatEvent, ChatOutbound, ChatUser, ClickHandlers, ClickReply, InboundMessage,
    PostRef,
};
use crate::command::{self, Command, ParseContext};
use crate::profile::ProfileBook;
use crate::session::short_id;
use crate::store::{now_ms, Platform, Session, Store, TranscriptEntry, TranscriptKind};

/// How many stored events one read of the replay takes.
const REPLAY_PAGE: i64 = 500;
/// How long a start request waits for the session to be recorded (or refused).
const START_WAIT: Duration = Duration::from_secs(60);

/// What the console needs from the active instance's chat side; absent on a standby.
pub struct Live {
    /// Every platform, recorded and gated (the chat side's router); [`ChatRouter::get`] gives
    /// one platform's adapter, where people are looked up.
    pub chat: ChatRouter,
    /// `SM_ALLOWED_USERS`, `SM_ADMIN_USERS`, resolved.
    pub roles: Roles,
    /// Each platform's dispatcher input: the console's messages join those of the platform.
    pub inboxes: HashMap<Platform, mpsc::Sender<ChatEvent>>,
    /// The profiles, for the start form.
    pub profiles: Arc<ProfileBook>,
    /// `SM_BOT_TRIGGER`.
    pub trigger: String,
}

/// Viewers (by name) and owners (by `id:` and their id) as each platform knows them;
/// `None`: not a user there.
type UserIds = HashMap<(String, Platform), Option<ChatUser>>;

/// The console. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    store: Store,
    transcript: Arc<Transcript>,
    auth: Arc<Auth>,
    live: Arc<RwLock<Option<Arc<Live>>>>,
    clicks: ClickHandlers,
    /// Viewers' user ids per platform, resolved once.
    ids: Arc<Mutex<UserIds>>,
    /// Fires at shutdown: event streams end, so the server's graceful shutdown is not held
    /// up by open pages.
    stop: tokio_util::sync::CancellationToken,
}

impl Console {
    /// The console over storage, the transcript, logins and the card click handler.
    pub fn new(
        store: Store,
        transcript: Arc<Transcript>,
        auth: Arc<Auth>,
        clicks: ClickHandlers,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            store,
            transcript,
            auth,
            live: Arc::default(),
            clicks,
            ids: Arc::default(),
            stop,
        }
    }

    /// The logins.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Installs (or, with `None`, removes) the active chat side.
    pub fn set_live(&self, live: Option<Arc<Live>>) {
        if let Ok(mut slot) = self.live.write() {
            *slot = live;
        }
    }

    /// The console's routes (see the module documentation).
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/console/sessions/{id}", get(session_page))
            .route("/console/sessions/{id}/events", get(events))
            .route("/console/api/sessions", post(start))
            .route("/console/api/sessions/{id}/messages", post(message))
            .route(
                "/console/api/sessions/{id}/commands/{command}",
                post(command),
            )
            .route("/console/api/cards/{post}/{action}", post(click))
            .route("/console/login", get(login_link).post(login_form))
            .route("/console/logout", post(logout))
            .route("/console/t/{post}", get(thread_link))
            .route("/console/static/{file}", get(asset))
            .layer(axum::middleware::map_response(security_headers))
            .with_state(self.clone())
    }

    fn live(&self) -> Result<Arc<Live>, Reject> {
        self.live
            .read()
            .ok()
            .and_then(|l| l.clone())
            .ok_or_else(|| {
                api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the bot is not the active instance right now (starting, or a standby); try again in a moment",
                )
            })
    }

    /// The viewer as `platform` knows them (looked up there once, by their name); on the
    /// console's own platform, their name is their id.
    async fn chat_user(
        &self,
        live: &Live,
        viewer: &Viewer,
        platform: Platform,
    ) -> Option<ChatUser> {
        if platform == Platform::Console {
            return Some(ChatUser {
                id: viewer.name.clone(),
                username: viewer.name.clone(),
            });
        }
        self.look_up(live, viewer.name.clone(), &viewer.name, platform)
            .await
    }

    /// `who` (an id or a username) on `platform` only, remembered under `key`.
    async fn look_up(
        &self,
        live: &Live,
        key: String,
        who: &str,
        platform: Platform,
    ) -> Option<ChatUser> {
        let key = (key, platform);
        if let Some(known) = self.ids.lock().ok().and_then(|ids| ids.get(&key).cloned()) {
            return known;
        }
        let adapter = live.chat.get(platform);
        if adapter.platform() != platform {
            // That platform is not served any more: nobody is known there.
            return None;
        }
        let found = adapter.resolve_user(who).await.ok();
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(key, found.clone());
        }
        found
    }

    /// How a session's owner is shown: their username on the session's platform (looked up
    /// once), or the id when the platform does not know it.
    async fn owner_name(&self, live: &Live, session: &Session) -> String {
        if session.platform == Platform::Console {
            return session.started_by.clone();
        }
        self.look_up(
            live,
            format!("id:{}", session.started_by),
            &session.started_by,
            session.platform,
        )
        .await
        .map_or_else(
            || session.started_by.clone(),
            |u| format!("@{}", u.username),
        )
    }

    /// The viewer's part in `session`.
    async fn role(
        &self,
        live: &Live,
        viewer: &Viewer,
        session: &Session,
    ) -> (Role, Option<ChatUser>) {
        let known = self.chat_user(live, viewer, session.platform).await;
        if viewer.operator {
            return (Role::Admin, known);
        }
        let Some(user) = &known else {
            return (Role::Outsider, None);
        };
        let participants = self
            .store
            .participants(&session.id)
            .await
            .unwrap_or_default();
        (live.roles.role(&user.id, session, &participants), known)
    }

    /// The session `id` if the viewer may `act` on it, with the viewer as its platform knows
    /// them.
    async fn session_for(
        &self,
        live: &Live,
        viewer: &Viewer,
        id: &str,
        act: Act,
    ) -> Result<(Session, ChatUser), Reject> {
        let session = match self.store.session(id).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(api_error(StatusCode::NOT_FOUND, "no such session")),
            Err(e) => {
                tracing::warn!(error = %e, "console: cannot read a session");
                return Err(api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage is not available right now",
                ));
            }
        };
        let (role, user) = self.role(live, viewer, &session).await;
        match user {
            Some(user) if role.may(act) => Ok((session, user)),
            _ if role == Role::Outsider => Err(api_error(StatusCode::NOT_FOUND, "no such session")),
            _ => Err(api_error(
                StatusCode::FORBIDDEN,
                "only the session's owner or an admin may do that",
            )),
        }
    }

    /// Hands a message to a platform's dispatcher, as if `user` had written it in `channel`
    /// (in `root`'s thread). Recorded first, like every inbound message.
    async fn deliver(
        &self,
        live: &Live,
        (platform, channel_id, root_id): (Platform, &str, Option<&str>),
        user: &str,
        name: &str,
        text: &str,
    ) -> Result<InboundMessage, Reject> {
        let inbox = live.inboxes.get(&platform).ok_or_else(|| {
            api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "that session's chat platform is not connected right now",
            )
        })?;
        let message = InboundMessage {
            platform,
            channel_id: channel_id.to_owned(),
            post_id: ConsoleChat::new_id(),
            root_id: root_id.map(str::to_owned),
            user_id: user.to_owned(),
            user_name: Some(name.to_owned()),
            text: text.to_owned(),
            created_at: now_ms(),
        };
        if let Err(e) = message.record(&self.store).await {
            tracing::warn!(error = %e, "console: cannot record a message");
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is not available right now, so the message was not sent",
            ));
        }
        inbox
            .send(ChatEvent::Message(message.clone()))
            .await
            .map_err(|_| api_error(StatusCode::SERVICE_UNAVAILABLE, "the bot is stopping"))?;
        Ok(message)
    }

    /// On a chat platform, tells the thread what was done from the console.
    async fn echo(&self, live: &Live, session: &Session, name: &str, text: &str) {
        if session.platform == Platform::Console {
            return;
        }
        let shown = format!("**@{name}** (web console): {}", text.replace('\n', "\n> "));
        if let Err(e) = live
            .chat
            .post(&session.channel_id, Some(&session.thread_id), &shown)
            .await
        {
            tracing::warn!(error = %e, "console: cannot show the console's message in the thread");
        }
    }
}

/// Who sent a request, or the answer for someone who is not logged in.
fn who(
    console: &Console,
    headers: &HeaderMap,
    peer: SocketAddr,
    page: bool,
) -> Result<Viewer, Reject> {
    match console.auth.viewer(headers, peer.ip()) {
        Ok(viewer) => Ok(viewer),
        Err(Refusal::Off) => Err(api_error(StatusCode::NOT_FOUND, "no such route")),
        Err(_) if page => Err(Reject::Login(console.auth.mode())),
        Err(_) => Err(api_error(StatusCode::UNAUTHORIZED, "not logged in")),
    }
}

/// [`who`] for a state-changing request: the CSRF token must match too.
fn who_acts(console: &Console, headers: &HeaderMap, peer: SocketAddr) -> Result<Viewer, Reject> {
    let viewer = who(console, headers, peer, false)?;
    console
        .auth
        .check_csrf(&viewer, headers)
        .map_err(|_| api_error(StatusCode::FORBIDDEN, "missing or wrong CSRF token"))?;
    Ok(viewer)
}

/// Why a console request is refused: JSON `{"error": …}` with the status, or the login page
/// for a page asked for without a login.
#[derive(Debug)]
pub enum Reject {
    /// An API answer.
    Api(StatusCode, String),
    /// A page without a login: the login page, status 401.
    Login(crate::config::ConsoleAuth),
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        match self {
            Self::Api(status, message) => {
                (status, Json(json!({ "error": message }))).into_response()
            }
            Self::Login(mode) => (
                StatusCode::UNAUTHORIZED,
                Html(login_page(mode, None).into_string()),
            )
                .into_response(),
        }
    }
}

fn api_error(status: StatusCode, message: &str) -> Reject {
    Reject::Api(status, message.to_owned())
}

// ------------------------------------------------------------------------------------------
// Pages
// ------------------------------------------------------------------------------------------

fn layout(title: &str, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(v) = viewer { meta name="csrf-token" content=(v.csrf); }
                title { (title) " · session-manager" }
                link rel="stylesheet" href="/console/static/console.css";
                script src="/console/static/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "session-manager" }
                    @if let Some(v) = viewer {
                        span.who { "@" (v.name) }
                        button.link type="button" data-logout { "Log out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn login_page(mode: crate::config::ConsoleAuth, problem: Option<&str>) -> Markup {
    use crate::config::ConsoleAuth;
    layout(
        "Log in",
        None,
        html! {
            h1 { "Log in" }
            @if let Some(p) = problem { p.error { (p) } }
            @match mode {
                ConsoleAuth::Link => p { "Open the login link the bot printed when it started. It works once; restart the bot for a new one." },
                ConsoleAuth::Token => form method="post" action="/console/login" {
                    label { "Token " input type="password" name="token" autocomplete="off" required; }
                    button type="submit" { "Log in" }
                },
                ConsoleAuth::Proxy => p { "Log in through your organisation's sign-in; this address must be reached through it." },
                ConsoleAuth::Off => p { "The console is off." },
            }
        },
    )
}

fn idle_text(session: &Session, now: i64) -> String {
    crate::dispatch::human_duration(now - session.last_activity_at)
}

fn state_text(session: &Session) -> String {
    if session.is_hibernating() {
        "hibernating".to_owned()
    } else {
        session.state().to_string()
    }
}

async fn index(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    let viewer = who(&console, &headers, peer, true)?;
    let live = console.live()?;
    let sessions = match console.store.active_sessions().await {
        Ok(s) => s,
        Err(_) => {
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is not available right now",
            ))
        }
    };
    let mut visible = Vec::new();
    for session in sessions {
        let (role, _) = console.role(&live, &viewer, &session).await;
        if role != Role::Outsider {
            let owner = console.owner_name(&live, &session).await;
            visible.push((session, owner));
        }
    }
    // What the start form offers: on the console's own platform the viewer's name is their id.
    let profiles = live.profiles.choices(&live.roles, &viewer.name);
    let now = now_ms();
    let page = layout(
        "Sessions",
        Some(&viewer),
        html! {
            h1 { "Sessions" }
            @if visible.is_empty() {
                p.empty { "No session you may see is running." }
            } @else {
                table.sessions {
                    thead { tr { th { "Session" } th { "Repository" } th { "Kind" } th { "State" } th { "Owner" } th { "Cost" } th { "Idle" } th { "Where" } } }
                    tbody {
                        @for (s, owner) in &visible {
                            tr data-session=(s.id) {
                                td { a href={ "/console/sessions/" (s.id) } { code { (short_id(&s.id)) } } }
                                td { (s.repo_slug()) @if let Some(b) = &s.branch { "@" (b) } }
                                td { (s.kind) }
                                td.state { (state_text(s)) }
                                td { (owner) }
                                td { (format!("${:.4}", s.stats.cost_usd)) }
                                td { (idle_text(s, now)) }
                                td { (s.platform) }
                            }
                        }
                    }
                }
            }
            h2 { "Start a session" }
            form id="start" {
                label { "Repository " input name="repo" placeholder="org/repo" required; }
                label { "Branch " input name="branch" placeholder="(default)"; }
                label.check { input type="checkbox" name="worktree"; " own worktree" }
                @if !profiles.is_empty() {
                    label { "Profile "
                        select name="profile" {
                            option value="" { "(default)" }
                            @for p in &profiles { option value=(p) { (p) } }
                        }
                    }
                }
                button type="submit" { "Start" }
                p.status aria-live="polite" {}
            }
        },
    );
    Ok(Html(page.into_string()).into_response())
}

async fn session_page(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    let viewer = who(&console, &headers, peer, true)?;
    let live = console.live()?;
    let (session, _) = console.session_for(&live, &viewer, &id, Act::Look).await?;
    let title = format!("{} {}", session.repo_slug(), short_id(&session.id));
    let owner = console.owner_name(&live, &session).await;
    let page = layout(
        &title,
        Some(&viewer),
        html! {
            section.session data-session=(session.id) {
                h1 { (session.repo_slug()) " " code { (short_id(&session.id)) } }
                p.meta {
                    span.state { (state_text(&session)) } " · " (session.kind)
                    " · owner " (owner)
                    " · " (format!("${:.4}", session.stats.cost_usd))
                    @if let Some(p) = &session.profile { " · profile " code { (p.name) } }
                    @if session.platform != Platform::Console { " · also in " (session.platform) }
                }
                div.controls {
                    @for (command, label) in [("interrupt", "Interrupt"), ("compact", "Compact"), ("clear", "Clear"), ("restart", "Restart"), ("stop", "Stop")] {
                        button type="button" data-command=(command) { (label) }
                    }
                }
                div id="conversation" aria-live="polite" {}
                form id="say" {
                    textarea name="text" rows="3" placeholder="Write to Claude (or a command such as !status)" required {}
                    button type="submit" { "Send" }
                    p.status aria-live="polite" {}
                }
            }
        },
    );
    Ok(Html(page.into_string()).into_response())
}

// ------------------------------------------------------------------------------------------
// The event stream
// ------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct EventsQuery {
    after: Option<i64>,
}

/// A transcript entry as a page gets it, with its text rendered to HTML.
fn event_json(entry: &TranscriptEntry) -> Value {
    let body = public_body(entry);
    let html = markdown_html(body["text"].as_str().unwrap_or_default());
    json!({
        "id": entry.id,
        "kind": entry.kind,
        "post_id": entry.post_id,
        "author": entry.author,
        "body": body,
        "html": html,
        "created_at": entry.created_at,
    })
}

struct Replay {
    store: Store,
    thread: String,
    viewer: String,
    after: i64,
    caught_up: bool,
    backlog: std::collections::VecDeque<TranscriptEntry>,
    live: broadcast::Receiver<TranscriptEntry>,
}

impl Replay {
    /// The next entry for this page: stored ones first, then live ones; each once, in order.
    async fn next(&mut self) -> Option<TranscriptEntry> {
        loop {
            while let Some(entry) = self.backlog.pop_front() {
                if entry.id <= self.after {
                    continue; // seen already (stored and live both had it)
                }
                self.after = entry.id;
                if !self.visible(&entry) {
                    continue;
                }
                return Some(entry);
            }
            if !self.caught_up {
                match self
                    .store
                    .transcript_after(&self.thread, self.after, REPLAY_PAGE)
                    .await
                {
                    Ok(page) if page.is_empty() => self.caught_up = true,
                    Ok(page) => {
                        self.backlog.extend(page);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "console: cannot read the transcript; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            match self.live.recv().await {
                Ok(entry) if entry.thread_id == self.thread => self.backlog.push_back(entry),
                Ok(_) => {}
                // Fell behind the live feed: storage has everything.
                Err(broadcast::error::RecvError::Lagged(_)) => self.caught_up = false,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Posts meant for one person (a notice) are shown to them only.
    fn visible(&self, entry: &TranscriptEntry) -> bool {
        let body: Value = serde_json::from_str(&entry.body).unwrap_or(Value::Null);
        body["only"].as_str().is_none_or(|only| only == self.viewer)
    }
}

async fn events(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    let viewer = who(&console, &headers, peer, false)?;
    let live = console.live()?;
    let (session, user) = console.session_for(&live, &viewer, &id, Act::Look).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(query.after)
        .unwrap_or(0)
        .max(0);
    // Subscribed before reading storage: nothing recorded meanwhile is missed.
    let replay = Replay {
        live: console.transcript.subscribe(),
        store: console.store.clone(),
        thread: session.thread_id.clone(),
        viewer: user.id,
        after,
        caught_up: false,
        backlog: Default::default(),
    };
    let stop = console.stop.clone();
    let stream = futures_util::stream::unfold(replay, move |mut replay| {
        let stop = stop.clone();
        async move {
            let entry = tokio::select! {
                () = stop.cancelled() => return None,
                entry = replay.next() => entry?,
            };
            let event = Event::default()
                .id(entry.id.to_string())
                .event("entry")
                .data(event_json(&entry).to_string());
            Some((Ok::<_, Infallible>(event), replay))
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Markdown to HTML for a page: raw HTML in the text is shown as text, and links keep only
/// `http(s)`, `mailto` and relative targets.
pub fn markdown_html(text: &str) -> String {
    use pulldown_cmark::{CowStr, Event as Md, Options, Parser, Tag};
    let safe = |url: &CowStr| {
        let lower = url.to_ascii_lowercase();
        lower.starts_with("http://")
            || lower.starts_with("https://")
            || lower.starts_with("mailto:")
            || lower.starts_with('/')
            || lower.starts_with('#')
    };
    let parser = Parser::new_ext(text, Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH).map(
        |event| match event {
            Md::Html(raw) | Md::InlineHtml(raw) => Md::Text(raw),
            // Chat shows a line break where the text has one.
            Md::SoftBreak => Md::HardBreak,
            Md::Start(Tag::Link {
                link_type,
                dest_url,
                title,
                id,
            }) if !safe(&dest_url) => Md::Start(Tag::Link {
                link_type,
                dest_url: CowStr::Borrowed("#"),
                title,
                id,
            }),
            Md::Start(Tag::Image { dest_url, .. }) => Md::Text(dest_url),
            Md::End(pulldown_cmark::TagEnd::Image) => Md::Text(CowStr::Borrowed("")),
            other => other,
        },
    );
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, parser);
    out
}

/// The console's Content Security Policy: its pages run only the console's own script and
/// style, load nothing from elsewhere and cannot be framed. Sent on every console response with
/// `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Headers on every console response: [`CONTENT_SECURITY_POLICY`] (a second wall behind the
/// Markdown sanitising: no inline script or handler runs, nothing is fetched from another
/// origin), no framing (`frame-ancestors 'none'`, `X-Frame-Options: DENY`: a page elsewhere
/// cannot trick a click on a card's button), no MIME sniffing, and no `Referer` (session ids are
/// in the URLs). Sources: W3C Content Security Policy Level 3 and Referrer Policy, RFC 7034
/// (X-Frame-Options), WHATWG Fetch (`nosniff`).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

// ------------------------------------------------------------------------------------------
// Requests
// ------------------------------------------------------------------------------------------

/// `POST /console/api/sessions`.
#[derive(Debug, Deserialize)]
struct StartRequest {
    repo: String,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    worktree: bool,
    #[serde(default)]
    profile: Option<String>,
}

async fn start(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(request): Json<StartRequest>,
) -> Result<Response, Reject> {
    let viewer = who_acts(&console, &headers, peer)?;
    let live = console.live()?;
    let mut words = request.repo.trim().to_owned();
    if let Some(branch) = request
        .branch
        .as_deref()
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        words = format!("{words}@{branch}");
    }
    let mut text = format!("{} start {words}", live.trigger);
    if request.worktree {
        text.push_str(" --worktree");
    }
    if let Some(profile) = request
        .profile
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        text.push_str(&format!(" --profile={profile}"));
    }
    // The same grammar as chat: a bad value is refused here, before anything is sent.
    let context = ParseContext {
        trigger: &live.trigger,
        default_org: None,
        in_session_thread: false,
    };
    match command::parse(&text, &context) {
        Some(Ok(Command::Start { .. })) => {}
        Some(Err(e)) if !matches!(e, command::CommandError::NoDefaultOrg { .. }) => {
            return Err(api_error(StatusCode::BAD_REQUEST, &e.to_string()));
        }
        Some(Err(_)) => {} // the dispatcher knows the default organisation
        _ => {
            return Err(api_error(
                StatusCode::BAD_REQUEST,
                "that is not a repository",
            ))
        }
    }
    let began = now_ms();
    let message = console
        .deliver(
            &live,
            (Platform::Console, LOBBY, None),
            &viewer.name,
            &viewer.name,
            &text,
        )
        .await?;
    // The answer: the new session, or what the dispatcher replied instead.
    let deadline = tokio::time::Instant::now() + START_WAIT;
    loop {
        if let Ok(sessions) = console.store.active_sessions().await {
            if let Some(s) = sessions.iter().find(|s| {
                s.platform == Platform::Console
                    && s.started_by == viewer.name
                    && s.created_at >= began
                    && s.parent_id.is_none()
            }) {
                return Ok(Json(
                    json!({ "session": s.id, "url": format!("/console/sessions/{}", s.id) }),
                )
                .into_response());
            }
        }
        if let Ok(replies) = console
            .store
            .transcript_after(&message.post_id, 0, 10)
            .await
        {
            if let Some(reply) = replies
                .iter()
                .filter(|r| r.kind == TranscriptKind::Post)
                .map(|r| {
                    public_body(r)["text"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .find(|t| !t.starts_with("Started session"))
            {
                return Err(api_error(StatusCode::CONFLICT, &reply));
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(api_error(
                StatusCode::ACCEPTED,
                "still starting: the session will appear in the list",
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `POST /console/api/sessions/{id}/messages`.
#[derive(Debug, Deserialize)]
struct MessageRequest {
    text: String,
}

async fn message(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<MessageRequest>,
) -> Result<Response, Reject> {
    let text = request.text.trim();
    if text.is_empty() {
        return Err(api_error(StatusCode::BAD_REQUEST, "the message is empty"));
    }
    say(&console, &headers, peer, &id, text, Act::Talk).await
}

/// Writes `text` into a session's thread for the viewer, if they may `act`.
async fn say(
    console: &Console,
    headers: &HeaderMap,
    peer: SocketAddr,
    id: &str,
    text: &str,
    act: Act,
) -> Result<Response, Reject> {
    let viewer = who_acts(console, headers, peer)?;
    let live = console.live()?;
    let (session, user) = console.session_for(&live, &viewer, id, act).await?;
    console.echo(&live, &session, &user.username, text).await;
    let message = console
        .deliver(
            &live,
            (
                session.platform,
                &session.channel_id,
                Some(&session.thread_id),
            ),
            &user.id,
            &user.username,
            text,
        )
        .await?;
    Ok(Json(json!({ "ok": true, "post_id": message.post_id })).into_response())
}

async fn command(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, command)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    let act = match command.as_str() {
        "interrupt" | "compact" => Act::Talk,
        "stop" | "clear" | "restart" => Act::Manage,
        _ => {
            return Err(api_error(
                StatusCode::NOT_FOUND,
                "unknown command: use stop, compact, clear, restart or interrupt",
            ))
        }
    };
    say(&console, &headers, peer, &id, &format!("!{command}"), act).await
}

async fn click(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((post_id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    let viewer = who_acts(&console, &headers, peer)?;
    let live = console.live()?;
    let entry = match console.store.transcript_latest(&post_id).await {
        Ok(Some(e)) if e.kind == TranscriptKind::Card => e,
        Ok(_) => return Err(api_error(StatusCode::NOT_FOUND, "no such card")),
        Err(_) => {
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is not available right now",
            ))
        }
    };
    let session = match console.store.session_by_thread_any(&entry.thread_id).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(api_error(StatusCode::NOT_FOUND, "no such card")),
        Err(_) => {
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage is not available right now",
            ))
        }
    };
    let (role, user) = console.role(&live, &viewer, &session).await;
    let Some(user) = user.filter(|_| role != Role::Outsider) else {
        return Err(api_error(StatusCode::NOT_FOUND, "no such card"));
    };
    let body: Value = serde_json::from_str(&entry.body).unwrap_or(Value::Null);
    let Some(context) = body["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"].as_str() == Some(action.as_str()))
        .and_then(|a| a["context"].as_object().cloned())
    else {
        return Err(api_error(
            StatusCode::CONFLICT,
            "this card has no such button (any more)",
        ));
    };
    let Some(handler) = console.clicks.get() else {
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not available right now; try again",
        ));
    };
    let clicked = CardClick {
        platform: session.platform,
        user_id: user.id,
        user_name: user.username,
        post_id: post_id.clone(),
        context,
    };
    match handler.on_click(clicked).await {
        Ok(ClickReply::Notice(text)) => Ok(Json(json!({ "notice": text })).into_response()),
        Ok(ClickReply::ReplaceCard(card)) => {
            // A chat server applies its own card from the click's answer; here the bot does,
            // on the platform (so the chat card changes at once) and in the transcript.
            let post = PostRef {
                channel_id: body["channel_id"].as_str().unwrap_or_default().to_owned(),
                post_id,
                root_id: Some(entry.thread_id.clone()),
            };
            if let Err(e) = live.chat.update_card(&post, &card).await {
                tracing::warn!(error = %e, "console: cannot replace the card on the chat platform");
            }
            Ok(Json(json!({ "ok": true, "title": card.title })).into_response())
        }
        Err(e) => {
            let status = match e {
                crate::chat::ClickError::BadRequest(_) => StatusCode::BAD_REQUEST,
                crate::chat::ClickError::Forbidden => StatusCode::FORBIDDEN,
                crate::chat::ClickError::NotFound => StatusCode::NOT_FOUND,
                crate::chat::ClickError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err(api_error(status, &e.to_string()))
        }
    }
}

// ------------------------------------------------------------------------------------------
// Logins, links, assets
// ------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

fn logged_in(id: &str) -> Response {
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&auth::set_cookie(id)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn login_link(State(console): State<Console>, Query(query): Query<LoginQuery>) -> Response {
    if console.auth.mode() == crate::config::ConsoleAuth::Off {
        return api_error(StatusCode::NOT_FOUND, "no such route").into_response();
    }
    match query.token.as_deref().and_then(|t| console.auth.login(t)) {
        Some((id, _)) => logged_in(&id),
        None => {
            let problem = query
                .token
                .is_some()
                .then_some("That login link or token is not valid (a link works once).");
            (
                StatusCode::FORBIDDEN,
                Html(login_page(console.auth.mode(), problem).into_string()),
            )
                .into_response()
        }
    }
}

async fn login_form(
    State(console): State<Console>,
    axum::extract::Form(form): axum::extract::Form<LoginQuery>,
) -> Response {
    login_link(State(console), Query(form)).await
}

async fn logout(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    who_acts(&console, &headers, peer)?;
    console.auth.logout(&headers);
    let mut response = Json(json!({ "ok": true })).into_response();
    if let Ok(value) = HeaderValue::from_str(&auth::clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

async fn thread_link(
    State(console): State<Console>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(post): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Reject> {
    who(&console, &headers, peer, true)?;
    match console.store.session_by_thread_any(&post).await {
        Ok(Some(s)) => Ok(Redirect::to(&format!("/console/sessions/{}", s.id)).into_response()),
        _ => Err(api_error(
            StatusCode::NOT_FOUND,
            "no session has that thread",
        )),
    }
}

const SCRIPT: &str = include_str!("static/console.js");
const STYLE: &str = include_str!("static/console.css");

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return api_error(StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::markdown_html;

    #[test]
    fn markdown_is_rendered_and_raw_html_and_script_links_are_not() {
        let html = markdown_html("**bold** `code`\n\n<script>alert(1)</script>\n\n[x](javascript:alert(1)) [y](https://example.com)");
        assert!(html.contains("<strong>bold</strong>"), "{html}");
        assert!(html.contains("<code>code</code>"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(html.contains("href=\"https://example.com\""), "{html}");
        let image = markdown_html("![alt](https://evil.example/track.png)");
        assert!(!image.contains("<img"), "{image}");
    }
}
