//! The node's HTTP face (axum): read-only queries and the WebSocket event gateway.
//!
//! Why: browsers, dashboards and Prometheus cannot speak libp2p. Nothing here changes state
//! except `POST /execute` (code execution, [`crate::execute`]), which needs a read-write token;
//! builds are submitted over libp2p (or the REAPI).
//!
//! Who may read what: `/health`, `/cache/stats` and `/metrics` are aggregates and open.
//! Anything that names a build (`/builds…`, the session events) needs a bearer token
//! (`Authorization: Bearer <token>`, or `?token=` on the WebSocket, which browsers cannot give
//! headers): the node's tokens, as for `rba-cache-server`. A token sees the builds of its own
//! tenant (`token:NAME`) and of the tenants its configuration lists (`tenants = [...]`, `"*"`
//! for all); other builds answer 404, exactly as builds that do not exist. Without a token the
//! answer is 401. `rba serve --public-read` opens these views to everyone (single-user and
//! demo nodes).
//!
//! - `GET /health`, `/builds?limit=N`, `/builds/{id}`, `/builds/{id}/logs` (plain text),
//!   `/cache/stats`, `/metrics` (Prometheus text).
//! - `POST /execute` (read-write token): run a Rust snippet or a stored binary, see
//!   [`crate::execute`]; 400 names the field at fault, 401 without a token, 403 with a
//!   read-only one, 429 when the execution queue is full.
//! - `GET /v1/sessions/{id}/events?from_seq=N` (WebSocket): one JSON text message per log line
//!   `{"session_id","type":"log","line"}`, then `{"session_id","type":"end","status":
//!   "success"|"error","duration_ms","binary_hash"}`, or `{"session_id","type":"error",
//!   "message"}` when the job itself broke (it could not run, or was cancelled). Each reader
//!   reads the job's log stream at its own pace: a slow socket never holds the build.

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rba_cache_server::auth::{ALL_TENANTS, Caller};
use rba_executor::logstream::parse_log_blob;
use rba_executor::runner::JobStatus;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::node::{NodeShared, SessionSource};

/// The router over a node.
pub fn router(node: Arc<NodeShared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/builds", get(builds))
        .route("/builds/{id}", get(build))
        .route("/builds/{id}/logs", get(build_logs))
        .route("/cache/stats", get(cache_stats))
        .route("/metrics", get(metrics))
        .route("/v1/sessions/{id}/events", get(events))
        .route("/execute", post(execute))
        .with_state(node)
}

/// Serves until `stop` turns true.
pub async fn serve(
    node: Arc<NodeShared>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    axum::serve(listener, router(node))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({ "error": what }))).into_response()
}

/// Who reads a view that names builds.
enum Viewer {
    /// Anyone: the node runs with `--public-read`.
    Public,
    /// A token's caller.
    Token(Caller),
}

impl Viewer {
    /// Whether it may see a build owned by `tenant` (`None`: a record from before tenants,
    /// visible only to callers that see every tenant).
    fn may_see(&self, tenant: Option<&str>) -> bool {
        match (self, tenant) {
            (Viewer::Public, _) => true,
            (Viewer::Token(caller), Some(tenant)) => caller.may_see(tenant),
            (Viewer::Token(caller), None) => caller.sees.iter().any(|t| t == ALL_TENANTS),
        }
    }
}

fn unauthorized(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({
            "error": format!(
                "{why}: views of builds need a token (Authorization: Bearer <token>, or \
                 ?token=<token> on the WebSocket), or a node started with --public-read"
            )
        })),
    )
        .into_response()
}

/// The viewer of a request: from its `Authorization` header, else `query_token` (the
/// WebSocket's `?token=`); without a valid token (unless the node is public), why not (the
/// handler answers 401 with it).
fn viewer(
    node: &NodeShared,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Viewer, String> {
    if node.config.public_read {
        return Ok(Viewer::Public);
    }
    token_caller(node, headers, query_token).map(Viewer::Token)
}

/// The caller of a request's token: its `Authorization` header, else `query_token`; never
/// anonymous (no token, a malformed header or an unknown token: why not).
fn token_caller(
    node: &NodeShared,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Caller, String> {
    match (headers.get(header::AUTHORIZATION), query_token) {
        (Some(value), _) => {
            let value = value
                .to_str()
                .map_err(|_| "malformed Authorization header".to_string())?;
            node.auth.authenticate_bearer(Some(value))
        }
        (None, Some(token)) => node.auth.authenticate_token(token),
        (None, None) => Err("no token".to_string()),
    }
}

/// Whether `viewer` may see session or build `id` (unknown ones: no).
fn may_see_build(node: &NodeShared, viewer: &Viewer, id: &str) -> bool {
    match viewer {
        Viewer::Public => true,
        Viewer::Token(_) => viewer.may_see(node.session_owner(id).as_deref()),
    }
}

async fn health(State(node): State<Arc<NodeShared>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "peer_id": node.network.peer_id().to_string(),
        "listen": node.network.dialable_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "queued": node.executor.queue_len(),
        "workers": node.config.workers,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn builds(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let viewer = match viewer(&node, &headers, None) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let limit = query.limit.unwrap_or(100).min(10_000);
    let history = node.history.clone();
    let records = tokio::task::spawn_blocking(move || {
        history.list_where(limit, |record| viewer.may_see(record.tenant.as_deref()))
    })
    .await
    .unwrap_or_default();
    axum::Json(records).into_response()
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
    match node
        .history
        .get(&id)
        .filter(|record| viewer.may_see(record.tenant.as_deref()))
    {
        Some(record) => axum::Json(record).into_response(),
        None => not_found(format!("no build {id:?}")),
    }
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
    if !may_see_build(&node, &viewer, &id) {
        return not_found(format!("no build {id:?}"));
    }
    let text = match node.session(&id) {
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
            let blobs = node.cas.blobs.clone();
            let bytes = tokio::task::spawn_blocking(move || blobs.read_to_vec(&digest, 1 << 30))
                .await
                .ok()
                .and_then(Result::ok);
            let Some(lines) = bytes.and_then(|b| parse_log_blob(&b).ok()) else {
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
    let stats = node.cas.blobs.stats();
    axum::Json(json!({
        "total_bytes": stats.total_bytes,
        "blob_count": stats.blob_count,
        "evictions": stats.evictions,
        "evicted_bytes": stats.evicted_bytes,
        "max_bytes": node.cas.blobs.config().max_bytes,
        "action_cache_entries": node.cas.actions.len(),
        "builds": node.history.len(),
    }))
    .into_response()
}

async fn metrics(State(node): State<Arc<NodeShared>>) -> Response {
    let stats = node.cas.blobs.stats();
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
            node.cas.actions.len() as u64,
        ),
        (
            "rba_jobs_queued",
            "Jobs waiting for a worker",
            node.executor.queue_len() as u64,
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
}

async fn events(
    State(node): State<Arc<NodeShared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let viewer = match viewer(&node, &headers, query.token.as_deref()) {
        Ok(viewer) => viewer,
        Err(why) => return unauthorized(&why),
    };
    let Some(source) = node
        .session(&id)
        .filter(|_| may_see_build(&node, &viewer, &id))
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
                let blobs = node.cas.blobs.clone();
                let bytes =
                    tokio::task::spawn_blocking(move || blobs.read_to_vec(&digest, 1 << 30))
                        .await??;
                for line in parse_log_blob(&bytes)?
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
    let caller = match token_caller(&node, &headers, None) {
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
