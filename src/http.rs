//! The small HTTP server both services run: `/metrics`, `/healthz`, `/readyz`,
//! plus whatever routes a service adds (the aggregator's JSON API).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// Connections served at once; past it a new one is closed at once, so
/// strangers cannot take the file descriptors the spool needs.
pub const MAX_CONNECTIONS: usize = 256;
/// A request's headers must arrive within this (a half-sent request is dropped).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed (gracefully, after its current request) this long
/// after it was opened: an idle keep-alive one does not stay forever.
pub const CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);

/// Serves `router` until `shutdown` is cancelled, with at most
/// [`MAX_CONNECTIONS`] connections, [`HEADER_READ_TIMEOUT`] and
/// [`CONNECTION_MAX_AGE`].
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or the peer gave up: never spin.
                    tracing::warn!(error = %e, ?addr, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    ?addr,
                    refused,
                    max = MAX_CONNECTIONS,
                    "HTTP connection limit reached; closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(64 * 1024);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let age = tokio::time::sleep(CONNECTION_MAX_AGE);
            tokio::pin!(age);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => {}
                _ = &mut age => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
        });
    }
}
