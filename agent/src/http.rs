//! The node's HTTP face (axum): the read API, the dashboard ([`crate::dashboard`]), the
//! WebSocket event gateway and `POST /execute`.
//!
//! Why: browsers, dashboards and Prometheus cannot speak libp2p. Nothing here changes state
//! except `POST /execute` (code execution, [`crate::execute`]), which needs a read-write token,
//! and the dashboard's login cookie; builds are submitted over libp2p (or the REAPI).
//!
//! Who may read what: `/health`, `/ready`, `/cache/stats` and `/metrics` are aggregates and open.
//! Anything that names a build (`/builds…`, the session events, badges, artifacts) needs a
//! token: `Authorization: Bearer <token>`, or `?token=` on the WebSocket (browsers cannot give
//! it headers), or the dashboard's HttpOnly cookie ([`TOKEN_COOKIE`], set by `POST /login`,
//! accepted only from the node's own origin). [`token_caller`] is the one place that reads
//! them. The node's tokens are those of `rba-cache-server`. A token sees the builds of its own
//! tenant (`token:NAME`) and of the tenants its configuration lists (`tenants = [...]`, `"*"`
//! for all); other builds answer 404, exactly as builds that do not exist. Without a token (or
//! with a bad one, or a bad cookie) the answer is 401. `rba serve --public-read` opens these
//! views to everyone (single-user and demo nodes).
//!
//! # The read API
//!
//! Typed by [`crate::views`]; the dashboard's pages use nothing else.
//!
//! - `GET /builds?limit=N&cursor=C&status=S&kind=K&workspace=W`: a JSON array of
//!   [`BuildView`]s, newest first, `limit` per page (default 50, at most 500). When older
//!   builds exist, a `Link: </builds?…&cursor=C>; rel="next"` header (RFC 8288) names the next
//!   page with the same filters. `status` is one of `queued`, `running`, `success`, `failed`,
//!   `error`, `cancelled` or `cache-hit`; `kind` one of `build`, `test`, `clippy`, `audit`,
//!   `check`, `fmt`, `run`. A bad filter or cursor: 400 `{"error","field"}`.
//! - `GET /builds/{id}`: one [`BuildView`]: status, queue position or units done / total while
//!   it runs, steps with durations, artifacts with digests, sizes and download links, the
//!   action digest and whether it was a cache hit.
//! - `GET /builds/{id}/logs`: the log as plain text (what was written so far while it runs).
//! - `GET /builds/{id}/artifacts/{index}`: an artifact's bytes (`application/octet-stream`).
//! - `GET /builds/{id}/badge.svg`, `/workspaces/{name}/badge.svg` (the latest build of a
//!   workspace the viewer may see): status badges, see [`crate::dashboard`].
//! - `GET /cache/stats`: a [`CacheView`] (store size, hit rate, evictions, slots, the shared
//!   registry cache's size). `GET /health` (the process lives); `GET /ready` (200 while it takes work, 503
//!   naming what fails: store, a drain for shutdown, workers); `GET /metrics` (Prometheus text).
//! - `GET /v1/sessions/{id}/events?from_seq=N` (WebSocket): one JSON text message per log line
//!   `{"session_id","type":"log","line"}`, then `{"session_id","type":"end","status":
//!   "success"|"error","duration_ms","binary_hash"}`, or `{"session_id","type":"error",
//!   "message"}` when the job itself broke (it could not run, or was cancelled). Each reader
//!   reads the job's log stream at its own pace: a slow socket never holds the build.
//! - `POST /execute` (read-write bearer token, never the cookie): run a Rust snippet or a
//!   stored binary, see [`crate::execute`]; 400 names the field at fault, 401 without a
//!   token, 403 with a read-only one, 429 when the execution queue is full.
//!
//! CORS: off unless the node's config lists origins (`http_cors_origins`, `"*"` for any); then
//! those origins may `GET` the read API with a bearer token (never with the cookie: no
//! credentialed CORS), and read its `Link` header.

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rba_cache_server::auth::{ALL_TENANTS, Caller};
use rba_executor::runner::JobStatus;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::node::{NodeShared, SessionSource};
use crate::views::{BuildView, CacheView, ListQuery};

/// The cookie a browser keeps its token in: set by the dashboard's `POST /login` (HttpOnly,
/// SameSite=Strict), cleared by `POST /logout`.
pub const TOKEN_COOKIE: &str = "rba_token";

/// The router over a node.
pub fn router(node: Arc<NodeShared>) -> Router {
    let read_api = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/builds", get(builds))
        .route("/builds/{id}", get(build))
        .route("/builds/{id}/logs", get(build_logs))
        .route("/builds/{id}/artifacts/{index}", get(artifact))
        .route("/cache/stats", get(cache_stats))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::badges());
    let read_api = match cors(&node.config.http_cors_origins) {
        Some(layer) => read_api.layer(layer),
        None => read_api,
    };
    Router::new()
        .merge(read_api)
        .merge(crate::dashboard::pages())
        .route("/v1/sessions/{id}/events", get(events))
        .route("/execute", post(execute))
        .with_state(node)
}

/// One configured CORS origin as a header value (`*` is handled by [`cors`]); the config's
/// validation calls it, so a node never starts with an origin it cannot send.
pub fn cors_origin(origin: &str) -> anyhow::Result<axum::http::HeaderValue> {
    let valid = origin == "*"
        || ((origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.ends_with('/')
            && origin.split("://").nth(1).is_some_and(|host| {
                !host.is_empty() && !host.contains('/') && !host.contains(char::is_whitespace)
            }));
    anyhow::ensure!(
        valid,
        "http_cors_origins: {origin:?} is not an origin like https://ci.example.com (or \"*\")"
    );
    Ok(axum::http::HeaderValue::from_str(origin)?)
}

/// The CORS layer of the read API, `None` when no origin is configured (no CORS headers: a
/// browser refuses other origins' pages the answers).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| cors_origin(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET])
            .allow_headers([header::AUTHORIZATION])
            .expose_headers([header::LINK])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Serves until `stop` turns true.
pub async fn serve(
    node: Arc<NodeShared>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    // Log lines go out as they come: without TCP_NODELAY a line written while the previous
    // one is unacknowledged waits for a delayed ACK (up to 40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on an HTTP connection");
        }
    });
    axum::serve(listener, router(node))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

pub(crate) fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({ "error": what }))).into_response()
}

/// Who reads a view that names builds.
pub(crate) enum Viewer {
    /// Anyone: the node runs with `--public-read`.
    Public,
    /// A token's caller.
    Token(Caller),
    /// A Tangle customer, by the account that signed the session's read message (its
    /// checksummed address): it sees the sessions its own job calls started.
    #[cfg(feature = "tangle")]
    Account(String),
}

impl Viewer {
    /// Whether it may see a build owned by `tenant` (`None`: a record from before tenants,
    /// visible only to callers that see every tenant).
    pub(crate) fn may_see(&self, tenant: Option<&str>) -> bool {
        match (self, tenant) {
            (Viewer::Public, _) => true,
            (Viewer::Token(caller), Some(tenant)) => caller.may_see(tenant),
            (Viewer::Token(caller), None) => caller.sees.iter().any(|t| t == ALL_TENANTS),
            #[cfg(feature = "tangle")]
            (Viewer::Account(account), tenant) => tenant.is_some_and(|tenant| {
                tenant.starts_with("tangle:") && tenant.ends_with(&format!("/{account}"))
            }),
        }
    }
}

pub(crate) fn unauthorized(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({
            "error": format!(
                "{why}: views of builds need a token (Authorization: Bearer <token>, \
                 ?token=<token> on the WebSocket, or the dashboard's login at /login), or a \
                 node started with --public-read"
            )
        })),
    )
        .into_response()
}

/// The viewer of a request: from its token (see [`token_caller`]: the header, `query_token`,
/// or the dashboard's cookie); without a valid one (unless the node is public), why not (the
/// handler answers 401 with it, a page sends the browser to the login).
pub(crate) fn viewer(
    node: &NodeShared,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Viewer, String> {
    if node.config.public_read {
        return Ok(Viewer::Public);
    }
    token_caller(node, headers, query_token, true).map(Viewer::Token)
}

/// The caller of a request's token, the one place that reads one: its `Authorization`
/// header, else `query_token` (the WebSocket's `?token=`), else (when `cookie`: reads, never
/// changes of state) the [`TOKEN_COOKIE`] of a request from the node's own origin. Never
/// anonymous: no token, a malformed header, an unknown token or a bad cookie is an error
/// saying why.
pub(crate) fn token_caller(
    node: &NodeShared,
    headers: &HeaderMap,
    query_token: Option<&str>,
    cookie: bool,
) -> Result<Caller, String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| "malformed Authorization header".to_string())?;
        return node.auth.authenticate_bearer(Some(value));
    }
    if let Some(token) = query_token {
        return node.auth.authenticate_token(token);
    }
    match cookie.then(|| cookie_token(headers)).flatten() {
        Some(token) => {
            if !same_origin(headers) {
                return Err(
                    "the dashboard's cookie is for the node's own pages, not for other origins"
                        .to_string(),
                );
            }
            node.auth
                .authenticate_token(&token)
                .map_err(|why| format!("bad login cookie ({why}): log in again at /login"))
        }
        None => Err("no token".to_string()),
    }
}

/// The value of the [`TOKEN_COOKIE`] a request carries.
pub(crate) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_string())
}

/// True unless the request names an `Origin` other than the host it was sent to (browsers
/// send `Origin` on cross-origin fetches and on every WebSocket handshake; SameSite does not
/// tell one port of a host from another).
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

async fn health(State(node): State<Arc<NodeShared>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "peer_id": node.network.peer_id().to_string(),
        "listen": node.network.dialable_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "queued": node.executor.queue_len(),
        "workers": node.config.workers.slots,
    }))
    .into_response()
}

/// Readiness, for load balancers and orchestrators: 200 when the node takes work (its store is
/// reachable, its executor is not draining for a shutdown and has workers; scaled out: the
/// database and the bucket answer and a worker was seen within a lease), else 503 naming
/// what is not (and why, under `reasons`). `/health` says the process lives; this says whether to send it builds.
async fn ready(State(node): State<Arc<NodeShared>>) -> Response {
    let root = node.cas.blobs.root().to_path_buf();
    let store = tokio::task::spawn_blocking(move || std::fs::metadata(&root).map(|m| m.is_dir()))
        .await
        .map(|r| matches!(r, Ok(true)))
        .unwrap_or(false);
    let mut checks = vec![
        ("store", store),
        ("accepting_jobs", !node.executor.is_draining()),
        ("workers", node.config.workers.slots > 0),
    ];
    let mut reasons = serde_json::Map::new();
    if let Some(shared) = &node.scale_out {
        // Scaled out: the shared database and bucket answer, and a worker was seen lately
        // (jobs run there, not in this process's slots).
        checks.retain(|(name, _)| *name != "workers");
        for (name, outcome) in shared.ready().await {
            let name = match name {
                "store" => "shared_store",
                other => other,
            };
            if let Err(reason) = &outcome {
                reasons.insert(name.to_string(), json!(reason));
            }
            checks.push((name, outcome.is_ok()));
        }
    }
    let failing: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| *name)
        .collect();
    let status = if failing.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, serde_json::Value> = checks
        .iter()
        .map(|(name, ok)| (name.to_string(), json!(ok)))
        .collect();
    (
        status,
        axum::Json(json!({
            "ready": failing.is_empty(),
            "checks": checks,
            "failing": failing,
            "reasons": reasons,
        })),
    )
        .into_response()
}

fn bad_request(field: &str, message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": message, "field": field })),
    )
        .into_response()
}

async fn builds(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return bad_request("query", rejection.body_text()),
    };
    let cursor = match query.check() {
        Ok(cursor) => cursor,
        Err(bad) => return bad_request(bad.field, bad.message),
    };
    let listed = node
        .history
        .page(cursor.as_ref(), query.page_size(), |record| {
            if !viewer.may_see(record.tenant.as_deref()) || !query.keeps_record(&record) {
                return None;
            }
            Some(BuildView::new(&node, record)).filter(|view| query.keeps_view(view))
        })
        .await;
    let page = match listed {
        Ok(page) => page,
        Err(e) => return history_unavailable(&e),
    };
    let mut response = axum::Json(page.items).into_response();
    if let Some(next) = page.next
        && let Ok(link) = axum::http::HeaderValue::from_str(&format!(
            "</builds?{}>; rel=\"next\"",
            query.next_query(&next)
        ))
    {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

/// The record of build `id` if `viewer` may see it.
pub(crate) async fn visible_record(
    node: &NodeShared,
    viewer: &Viewer,
    id: &str,
) -> Option<crate::history::BuildRecord> {
    node.history
        .get(id)
        .await
        .filter(|record| viewer.may_see(record.tenant.as_deref()))
}

/// 503 naming why the build history could not be read (its database unreachable).
pub(crate) fn history_unavailable(error: &anyhow::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "error": format!("the build history cannot be read: {error:#}") })),
    )
        .into_response()
}

async fn build(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    match visible_record(&node, &viewer, &id).await {
        Some(record) => axum::Json(BuildView::new(&node, record)).into_response(),
        None => not_found(format!("no build {id:?}")),
    }
}

/// An artifact's bytes, streamed from the CAS.
async fn artifact(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let missing = || not_found(format!("no artifact {index:?} of build {id:?}"));
    let Some(record) = visible_record(&node, &viewer, &id).await else {
        return missing();
    };
    let Some(artifact) = index
        .parse::<usize>()
        .ok()
        .and_then(|i| record.artifacts.get(i))
    else {
        return missing();
    };
    let Ok(digest) = artifact.digest.parse::<rba_cas::Digest>() else {
        return missing();
    };
    let reader = match node.cas.blobs.reader(&digest, 0, digest.size) {
        Ok(reader) => reader,
        Err(_) => {
            return not_found(format!(
                "artifact {index} of build {id:?} is no longer stored"
            ));
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut reader = reader;
        loop {
            let mut chunk = vec![0u8; 256 << 10];
            match reader.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let body = axum::body::Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let name: String = artifact
        .path
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, digest.size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

/// The log as plain text, one line per line: what was written so far for a running job.
async fn build_logs(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let text = match node
        .visible_session(&id, |owner| viewer.may_see(owner))
        .await
    {
        Some(SessionSource::Live(handle)) => {
            let upto = handle.log.lines_written();
            let mut reader = handle.log.subscribe(0);
            let mut text = String::new();
            while reader.position() < upto {
                match reader.next().await {
                    Some(line) => {
                        text.push_str(&line.line);
                        text.push('\n');
                    }
                    None => break,
                }
            }
            text
        }
        Some(SessionSource::Finished(record)) => {
            let Some(digest) = record
                .log_digest
                .as_deref()
                .and_then(|d| d.parse::<rba_cas::Digest>().ok())
            else {
                return not_found(format!("build {id:?} has no stored log"));
            };
            let Ok(lines) = node.stored_log(&digest).await else {
                return not_found(format!("the log of build {id:?} is no longer stored"));
            };
            lines.into_iter().fold(String::new(), |mut text, line| {
                text.push_str(&line.line);
                text.push('\n');
                text
            })
        }
        None => return not_found(format!("no build {id:?}")),
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn cache_stats(State(node): State<Arc<NodeShared>>) -> Response {
    let usage = node.cache_usage().await;
    let builds = match node.history.count().await {
        Ok(builds) => builds,
        Err(e) => return history_unavailable(&e),
    };
    axum::Json(CacheView::new(&node, usage, builds)).into_response()
}

async fn metrics(State(node): State<Arc<NodeShared>>) -> Response {
    let stats = node.store_stats();
    let queued = node.jobs_queued().await;
    let text = node.metrics.render(&[
        ("rba_cas_bytes", "Bytes held by the CAS", stats.total_bytes),
        ("rba_cas_blobs", "Blobs held by the CAS", stats.blob_count),
        (
            "rba_cas_evictions",
            "Blobs evicted since start",
            stats.evictions,
        ),
        (
            "rba_action_cache_entries",
            "Action cache entries",
            node.action_cache_entries(),
        ),
        (
            "rba_jobs_queued",
            "Jobs waiting for a worker (scaled out: in the shared queue)",
            queued,
        ),
    ]);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    from_seq: Option<u64>,
    /// The bearer token, for browsers (which cannot set headers on a WebSocket).
    token: Option<String>,
    /// A Tangle customer's signature of the session's read message
    /// ([`crate::tangle::session_read_message`]), instead of a token.
    #[cfg(feature = "tangle")]
    sig: Option<String>,
}

/// Who reads a session's events: a Tangle customer by its signature of the session's read
/// message, else as for every view (token or `--public-read`).
fn events_viewer(
    node: &NodeShared,
    headers: &HeaderMap,
    query: &EventsQuery,
    id: &str,
) -> Result<Viewer, String> {
    #[cfg(feature = "tangle")]
    if let Some(sig) = query.sig.as_deref() {
        return crate::tangle::session_reader(id, sig).map(Viewer::Account);
    }
    #[cfg(not(feature = "tangle"))]
    let _ = id;
    viewer(node, headers, query.token.as_deref())
}

async fn events(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let viewer = match events_viewer(&node, &headers, &query, &id) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let Some(source) = node
        .visible_session(&id, |owner| viewer.may_see(owner))
        .await
    else {
        return not_found(format!("no session {id:?}"));
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    node.metrics.inc_ws_clients();
    let from_seq = query.from_seq.unwrap_or(0);
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = stream_events(node, socket, id, source, from_seq).await {
            tracing::debug!(error = %e, "WebSocket client went away");
        }
    })
}

async fn send_json(socket: &mut WebSocket, value: serde_json::Value) -> anyhow::Result<()> {
    socket.send(Message::Text(value.to_string().into())).await?;
    Ok(())
}

fn log_event(id: &str, line: &str) -> serde_json::Value {
    json!({ "session_id": id, "type": "log", "line": line })
}

async fn stream_events(
    node: Arc<NodeShared>,
    mut socket: WebSocket,
    id: String,
    source: SessionSource,
    from_seq: u64,
) -> anyhow::Result<()> {
    let last = match source {
        SessionSource::Live(handle) => {
            let mut reader = handle.log.subscribe(from_seq);
            while let Some(line) = reader.next().await {
                send_json(&mut socket, log_event(&id, &line.line)).await?;
            }
            let outcome = handle.wait().await;
            let binary_hash = outcome
                .artifacts
                .iter()
                .find(|a| a.executable)
                .map(|a| a.digest.hash_hex());
            match outcome.status {
                JobStatus::Success | JobStatus::Failed => json!({
                    "session_id": id,
                    "type": "end",
                    "status": if outcome.status == JobStatus::Success { "success" } else { "error" },
                    "duration_ms": outcome.duration.as_millis() as u64,
                    "binary_hash": binary_hash,
                }),
                JobStatus::Error | JobStatus::Cancelled => json!({
                    "session_id": id,
                    "type": "error",
                    "message": outcome.error.clone().unwrap_or_else(|| "the job broke".to_string()),
                }),
            }
        }
        SessionSource::Finished(record) => {
            let digest = record
                .log_digest
                .as_deref()
                .and_then(|d| d.parse::<rba_cas::Digest>().ok());
            if let Some(digest) = digest {
                for line in node
                    .stored_log(&digest)
                    .await?
                    .into_iter()
                    .filter(|l| l.seq >= from_seq)
                {
                    send_json(&mut socket, log_event(&id, &line.line)).await?;
                }
            }
            let binary_hash = record
                .artifacts
                .iter()
                .find(|a| a.executable)
                .and_then(|a| a.digest.parse::<rba_cas::Digest>().ok())
                .map(|d| d.hash_hex());
            match record.status.as_str() {
                "success" | "failed" => json!({
                    "session_id": id,
                    "type": "end",
                    "status": if record.status == "success" { "success" } else { "error" },
                    "duration_ms": record.duration_ms.unwrap_or(0),
                    "binary_hash": binary_hash,
                }),
                _ => json!({
                    "session_id": id,
                    "type": "error",
                    "message": record.error.clone().unwrap_or_else(|| "the job broke".to_string()),
                }),
            }
        }
    };
    send_json(&mut socket, last).await?;
    let _ = socket.send(Message::Close(None)).await;
    Ok(())
}

/// `POST /execute`: see [`crate::execute`].
async fn execute(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::execute::{ExecuteBody, ExecuteError};
    use rba_cache_server::auth::Access;
    // Never the node's `--public-read`: running code always needs a read-write token.
    let caller = match token_caller(&node, &headers, None, false) {
        Ok(caller) => caller,
        Err(why) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({
                    "error": format!(
                        "{why}: POST /execute needs a read-write token (Authorization: Bearer <token>)"
                    )
                })),
            )
                .into_response();
        }
    };
    if caller.access != Access::ReadWrite {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({ "error": "POST /execute needs a read-write token" })),
        )
            .into_response();
    }
    let execution = match ExecuteBody::parse(&body).and_then(|b| b.check(node.execute.config())) {
        Ok(execution) => execution,
        Err(bad) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": bad.to_string(), "field": bad.field })),
            )
                .into_response();
        }
    };
    // A token caller always has a name (only an anonymous caller has none).
    let tenant = rba_executor::tenant::Tenant::token(caller.token.as_deref().unwrap_or_default());
    let reads_all = caller.sees.iter().any(|t| t == ALL_TENANTS);
    match crate::execute::execute(&node, tenant, reads_all, execution).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(error @ ExecuteError::Busy { .. }) => (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
        Err(error @ ExecuteError::NoArtifact(_)) => not_found(error.to_string()),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}
