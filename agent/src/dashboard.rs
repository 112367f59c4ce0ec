//! The build dashboard: HTML pages, their embedded script and style, the login cookie and the
//! SVG status badges, mounted on the node's HTTP port by [`crate::http`].
//!
//! Why in the binary: a node must show its builds with no network and nothing else installed
//! (no CDN, no bundler, no second server). The pages are a small hand-written script and style
//! sheet (`dashboard/app.js`, `dashboard/app.css`, embedded with `include_str!`; see
//! [`ASSET_BYTES`]) over the documented read API of [`crate::http`] — the dashboard reads
//! nothing the API does not give curl — and the existing WebSocket for the live log.
//!
//! Pages (HTML; without a token the browser is sent to `/login?next=…`):
//! - `/`: the builds, newest first, a page at a time (the API's cursor), filterable by status
//!   and kind; each row has a status badge (queued with its position, running, success,
//!   failed, error, cancelled, cache hit), the kind, workspace, submitter, duration and, while
//!   a build runs, its units done / total, refreshed every second.
//! - `/ui/builds/{id}`: one build: status, the action digest and whether it was a cache hit,
//!   its steps with durations, each expandable into the lines it printed (the executor notes
//!   where in the log each step ended, `JobOutcome::step_end_lines`; steps are known once the
//!   build ends), its artifacts (digest, size, download), and the whole log following live
//!   over `/v1/sessions/{id}/events`, cargo's ANSI colours rendered as HTML. Another tenant's
//!   build is a 404 page, exactly as a build that does not exist.
//! - `/ui/cache`: store size, hit rate, evictions, slots, the shared registry cache's size.
//! - `/login`: a form that posts a token once; `POST /login` checks it and sets the
//!   [`TOKEN_COOKIE`] (HttpOnly: no script reads it; SameSite=Strict: no other site's request
//!   carries it), which the read endpoints accept as they accept the bearer header
//!   ([`crate::http::token_caller`]). `POST /logout` clears it. Both refuse other origins.
//!
//! Badges (`image/svg+xml`, same access rules as the API): `/builds/{id}/badge.svg` and
//! `/workspaces/{name}/badge.svg` (the latest build of that workspace the viewer may see).
//!
//! Every page is served with a Content-Security-Policy that allows only the node's own script,
//! style and connections, so a log line can never run as script even if the renderer were
//! wrong (it escapes everything: [`html_escape`] here, `esc` in the script).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::http::{TOKEN_COOKIE, Viewer, not_found, unauthorized, viewer, visible_record};
use crate::node::NodeShared;
use crate::views::BuildView;

const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Bytes of script and style the dashboard serves (all of it: the pages load nothing else).
pub const ASSET_BYTES: usize = APP_JS.len() + APP_CSS.len();
// The budget: the dashboard stays small enough to read, and to load at once on any link.
const _: () = assert!(ASSET_BYTES < 20_000, "the dashboard's JS+CSS outgrew 20 kB");

/// What every dashboard answer says about itself.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How long a login lasts (seconds).
const LOGIN_MAX_AGE: u64 = 30 * 24 * 3600;

type Node = State<Arc<NodeShared>>;

/// The HTML pages, assets, login and logout.
pub fn pages() -> Router<Arc<NodeShared>> {
    Router::new()
        .route("/", get(builds_page))
        .route("/ui/builds/{id}", get(build_page))
        .route("/ui/cache", get(cache_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/app.js", get(|| asset(APP_JS, "text/javascript")))
        .route("/assets/app.css", get(|| asset(APP_CSS, "text/css")))
        // Pages name no icon file (`data:,`); answers that are not pages make browsers ask.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

/// The SVG badges (part of the read API: CORS applies).
pub fn badges() -> Router<Arc<NodeShared>> {
    Router::new()
        .route("/builds/{id}/badge.svg", get(build_badge))
        .route("/workspaces/{name}/badge.svg", get(workspace_badge))
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        body,
    )
        .into_response()
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Not `no-referrer`: with it a form's POST says `Origin: null`, and the login
            // refuses requests that do not come from the node's own pages.
            (header::REFERRER_POLICY, "same-origin"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// A page of the dashboard: the shell the script fills from the API (`page`, `id` as data
/// attributes, and the values the builds list's filters offer: the API's own, so a new job
/// kind or status needs no change to the script), or a message in `main` when there is
/// nothing to fetch.
fn page(title: &str, page: &str, id: &str, main: &str, logged_in: bool) -> String {
    let logout = if logged_in {
        r#"<form method="post" action="/logout"><button type="submit">Log out</button></form>"#
    } else {
        ""
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>{title} · rba</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/assets/app.css"></head><body data-page="{page}" data-id="{id}" data-kinds="{kinds}" data-statuses="{statuses}"><header><a class="brand" href="/">rba</a><nav><a href="/">Builds</a><a href="/ui/cache">Cache</a></nav>{logout}</header><main id="main">{main}</main><script src="/assets/app.js" defer></script></body></html>"#,
        title = html_escape(title),
        page = page,
        id = html_escape(id),
        kinds = crate::views::kinds().collect::<Vec<_>>().join(" "),
        statuses = crate::views::STATUSES.join(" ") + " cache-hit",
    )
}

/// The answer that sends a browser without a valid login to the login form (and clears a
/// bad cookie on the way).
struct ToLogin {
    next: String,
    clear_cookie: bool,
}

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        let location = format!("/login?next={}", url_escape(&self.next));
        let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response();
        if self.clear_cookie {
            response
                .headers_mut()
                .insert(header::SET_COOKIE, clear_cookie());
        }
        response
    }
}

/// A page's viewer, or the way to the login.
fn page_viewer(node: &NodeShared, headers: &HeaderMap, path: &str) -> Result<Viewer, ToLogin> {
    viewer(node, headers, None).map_err(|_| ToLogin {
        next: path.to_string(),
        clear_cookie: crate::http::cookie_token(headers).is_some(),
    })
}

fn logged_in(headers: &HeaderMap) -> bool {
    crate::http::cookie_token(headers).is_some()
}

async fn builds_page(State(node): Node, headers: HeaderMap) -> Response {
    if let Err(login) = page_viewer(&node, &headers, "/") {
        return login.into_response();
    }
    html(
        StatusCode::OK,
        page("Builds", "builds", "", "", logged_in(&headers)),
    )
}

async fn build_page(State(node): Node, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let viewer = match page_viewer(&node, &headers, &format!("/ui/builds/{id}")) {
        Ok(viewer) => viewer,
        Err(login) => return login.into_response(),
    };
    if visible_record(&node, &viewer, &id).await.is_none() {
        return html(
            StatusCode::NOT_FOUND,
            page(
                "Not found",
                "none",
                "",
                &format!(
                    "<h1>Not found</h1><p>No build {}.</p>",
                    html_escape(&format!("{id:?}"))
                ),
                logged_in(&headers),
            ),
        );
    }
    html(
        StatusCode::OK,
        page("Build", "build", &id, "", logged_in(&headers)),
    )
}

async fn cache_page(State(node): Node, headers: HeaderMap) -> Response {
    if let Err(login) = page_viewer(&node, &headers, "/ui/cache") {
        return login.into_response();
    }
    html(
        StatusCode::OK,
        page("Cache", "cache", "", "", logged_in(&headers)),
    )
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    next: Option<String>,
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// Where to go after the login: a path of this node, else `/` (never another site).
fn safe_next(next: &str) -> &str {
    let local = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control());
    if local { next } else { "/" }
}

fn login_form(next: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error">{}</p>"#, html_escape(e)))
        .unwrap_or_default();
    page(
        "Log in",
        "login",
        "",
        &format!(
            r#"<h1>Log in</h1>{error}<form class="login" method="post" action="/login"><label>Token <input type="password" name="token" autocomplete="current-password" required autofocus></label><input type="hidden" name="next" value="{next}"><button type="submit">Log in</button></form><p class="hint">A token of this node (<code>--token NAME:TOKEN:ACCESS</code>). It is kept in an HttpOnly cookie for this site only.</p>"#,
            next = html_escape(safe_next(next)),
        ),
        false,
    )
}

async fn login_page(
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let next = query.ok().and_then(|Query(q)| q.next).unwrap_or_default();
    html(StatusCode::OK, login_form(&next, None))
}

fn clear_cookie() -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_str(&format!(
        "{TOKEN_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
    .expect("a static cookie is a header value")
}

async fn login(
    State(node): Node,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !crate::http::same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin login refused").into_response();
    }
    let Ok(axum::Form(form)) = form else {
        return html(
            StatusCode::BAD_REQUEST,
            login_form("/", Some("The form needs a token.")),
        );
    };
    let token = form.token.trim();
    // A cookie value carries no separators, quotes or spaces; such a token cannot log in.
    let cookie_safe = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'));
    if !cookie_safe || node.auth.authenticate_token(token).is_err() {
        return html(
            StatusCode::UNAUTHORIZED,
            login_form(&form.next, Some("That token is not one of this node's.")),
        );
    }
    let cookie = format!(
        "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={LOGIN_MAX_AGE}"
    );
    let mut response = (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, safe_next(&form.next).to_string())],
    )
        .into_response();
    if let Ok(cookie) = axum::http::HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn logout(headers: HeaderMap) -> Response {
    if !crate::http::same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin logout refused").into_response();
    }
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    response
}

/// Percent-encodes a path for a query value.
fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A shields-style badge: `label | value`, the value's colour by status.
pub fn badge_svg(label: &str, value: &str) -> String {
    let colour = match value {
        "success" | "cache hit" => "#2e7d32",
        "failed" | "error" => "#c62828",
        "running" => "#1565c0",
        "queued" => "#6a1b9a",
        _ => "#757575",
    };
    // Verdana 11px averages about 7px a character.
    let width = |text: &str| 10 + 7 * text.chars().count();
    let (left, right) = (width(label), width(value));
    let (label, value) = (html_escape(label), html_escape(value));
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{label}: {value}"><title>{label}: {value}</title><rect width="{left}" height="20" fill="#555"/><rect x="{left}" width="{right}" height="20" fill="{colour}"/><g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{rx}" y="14">{value}</text></g></svg>"##,
        total = left + right,
        lx = left / 2,
        rx = left + right / 2,
    )
}

fn svg(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'"),
        ],
        body,
    )
        .into_response()
}

async fn build_badge(State(node): Node, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    match visible_record(&node, &viewer, &id).await {
        Some(record) => {
            let view = BuildView::new(&node, record);
            svg(StatusCode::OK, badge_svg(&view.kind, view.badge_label()))
        }
        None => not_found(format!("no build {id:?}")),
    }
}

async fn workspace_badge(
    State(node): Node,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let latest = node
        .history
        .latest(|record| {
            record.workspace.as_deref() == Some(name.as_str())
                && viewer.may_see(record.tenant.as_deref())
        })
        .await;
    match latest {
        Err(e) => crate::http::history_unavailable(&e),
        Ok(Some(record)) => {
            let view = BuildView::new(&node, record);
            svg(StatusCode::OK, badge_svg(&view.kind, view.badge_label()))
        }
        Ok(None) => svg(StatusCode::NOT_FOUND, badge_svg("build", "unknown")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_redirects_stay_on_the_node() {
        assert_eq!(
            html_escape(r#"<img src=x onerror="a">&'"#),
            "&lt;img src=x onerror=&quot;a&quot;&gt;&amp;&#39;"
        );
        assert_eq!(safe_next("/ui/builds/x"), "/ui/builds/x");
        for hostile in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "",
            "/a\nb",
        ] {
            assert_eq!(safe_next(hostile), "/", "{hostile:?}");
        }
        let badge = badge_svg("build", "<cache hit>");
        assert!(badge.contains("&lt;cache hit&gt;") && badge.starts_with("<svg"));
    }
}
