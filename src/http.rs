//! The small HTTP server both services run: `/metrics`, `/healthz`, `/readyz`,
//! plus whatever routes a service adds (the aggregator's JSON API).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness: `Ok(notes)` (ready; notes are shown in the body, e.g. "Kafka
/// unreachable; spooling") or the reasons the service is not ready.
pub type ReadyFn = Arc<dyn Fn() -> Result<Vec<String>, Vec<String>> + Send + Sync>;

/// Appends series that are not in the registry (written at scrape time).
pub type ExtraMetricsFn = Arc<dyn Fn(&mut String) + Send + Sync>;

#[derive(Clone)]
struct BaseState {
    registry: Registry,
    ready: ReadyFn,
    extra: Option<ExtraMetricsFn>,
}

/// Router with `/metrics`, `/healthz` and `/readyz`.
pub fn base_router(registry: Registry, ready: ReadyFn, extra: Option<ExtraMetricsFn>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(BaseState {
            registry,
            ready,
            extra,
        })
}

async fn metrics(State(s): State<BaseState>) -> Response {
    let body = tokio::task::spawn_blocking(move || {
        let mut text = crate::telemetry::encode(&s.registry);
        if let Some(extra) = &s.extra {
            extra(&mut text);
        }
        text
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn readyz(State(s): State<BaseState>) -> Response {
    match (s.ready)() {
        Ok(notes) => {
            let mut body = String::from("ready\n");
            for n in notes {
                body.push_str(&n);
                body.push('\n');
            }
            (StatusCode::OK, body).into_response()
        }
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
            .into_response(),
    }
}

/// Binds `addr`, with an error that says what to change when the port is taken.
pub async fn bind(addr: &str, key: &str) -> Result<TcpListener, String> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| format!("{key} = {addr:?} is not an address: {e}"))?;
    TcpListener::bind(sock)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({key}): {e}"))
}

/// Serves `router` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, ?addr, "HTTP server failed");
    }
}
