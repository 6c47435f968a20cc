//! HTTP for the aggregator: `/metrics`, `/healthz`, `/readyz` (partitions
//! assigned), and the JSON API `GET /api/devices` and `GET /api/devices/{id}`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::state::{DeviceState, Window};
use super::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    let ready = {
        let s = shared.clone();
        Arc::new(move || {
            let problem = s.metrics.security.current("kafka");
            if s.metrics.assigned.get() > 0 {
                Ok(problem.map(|p| format!("kafka: {p}")).into_iter().collect())
            } else {
                Err(vec![match problem {
                    Some(p) => format!("no partitions assigned: {p}"),
                    None => "no partitions assigned (yet)".to_string(),
                }])
            }
        })
    };
    let extra = {
        let s = shared.clone();
        Arc::new(move |out: &mut String| {
            let snap = super::metrics::snapshot(&s.state(), s.max_devices, super::now_ms());
            super::metrics::render_devices(&snap, out);
        })
    };
    let api = Router::new()
        .route("/api/stats", get(stats))
        .route("/api/devices", get(list))
        .route("/api/devices/{id}", get(one))
        .with_state(shared.clone());
    crate::http::base_router(shared.metrics.registry.clone(), ready, Some(extra)).merge(api)
}

#[derive(Serialize)]
struct DeviceSummary<'a> {
    device_id: &'a str,
    temperature: f64,
    humidity: f64,
    dew_point: f64,
    /// RFC 3339 event time of the newest reading.
    last_seen: String,
    count: u64,
    online: bool,
    partition: i32,
}

fn summary<'a>(id: &'a str, d: &DeviceState, online: bool) -> DeviceSummary<'a> {
    summary_values(d, online).with_id(id)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A page of `GET /api/devices`, by device id.
#[derive(Deserialize)]
struct ListQuery {
    /// Devices per page ([`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    limit: Option<usize>,
    /// The last device id of the previous page (`next_cursor`).
    cursor: Option<String>,
}

pub const DEFAULT_PAGE: usize = 1000;
pub const MAX_PAGE: usize = 10_000;

/// Devices sorted by id, a page at a time. Under the state lock it only picks
/// the page (one pass keeping the `limit` smallest ids after the cursor) and
/// copies those; the JSON is written after the lock is released.
async fn list(State(shared): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let now = super::now_ms();
    let (total, page) = {
        let state = shared.state();
        let after = q.cursor.as_deref();
        let mut ids: std::collections::BinaryHeap<&str> = std::collections::BinaryHeap::new();
        for (id, _) in state.devices.iter() {
            if after.is_some_and(|a| id <= a) {
                continue;
            }
            if ids.len() < limit {
                ids.push(id);
            } else if ids.peek().is_some_and(|&top| id < top) {
                ids.pop();
                ids.push(id);
            }
        }
        let page: Vec<OwnedSummary> = ids
            .into_sorted_vec()
            .into_iter()
            .filter_map(|id| {
                let d = state.devices.get(id)?;
                Some(OwnedSummary {
                    id: id.to_string(),
                    d: summary_values(d, state.is_online(d, now)),
                })
            })
            .collect();
        (state.devices.len(), page)
    };
    let next = (page.len() == limit)
        .then(|| page.last().map(|p| p.id.clone()))
        .flatten();
    let devices: Vec<DeviceSummary<'_>> = page.iter().map(|p| p.d.with_id(&p.id)).collect();
    Json(serde_json::json!({
        "count": devices.len(),
        "total": total,
        "devices": devices,
        "next_cursor": next,
    }))
    .into_response()
}

/// A device's summary copied out of the state.
struct OwnedSummary {
    id: String,
    d: SummaryValues,
}

#[derive(Clone, Copy)]
struct SummaryValues {
    temperature: f64,
    humidity: f64,
    dew_point: f64,
    last_ts_ms: i64,
    count: u64,
    online: bool,
    partition: i32,
}

impl SummaryValues {
    fn with_id<'a>(&self, id: &'a str) -> DeviceSummary<'a> {
        DeviceSummary {
            device_id: id,
            temperature: self.temperature,
            humidity: self.humidity,
            dew_point: self.dew_point,
            last_seen: crate::reading::format_ts(self.last_ts_ms),
            count: self.count,
            online: self.online,
            partition: self.partition,
        }
    }
}

fn summary_values(d: &DeviceState, online: bool) -> SummaryValues {
    SummaryValues {
        temperature: d.temperature,
        humidity: d.humidity,
        dew_point: round2(d.dew_point()),
        last_ts_ms: d.last_ts_ms,
        count: d.count,
        online,
        partition: d.partition,
    }
}

#[derive(Deserialize)]
struct WindowsQuery {
    /// How many of the newest windows to return (default 10).
    windows: Option<usize>,
}

#[derive(Serialize)]
struct WindowOut<'a> {
    start: String,
    end: String,
    #[serde(flatten)]
    w: &'a Window,
}

async fn one(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<WindowsQuery>,
) -> Response {
    let state = shared.state();
    let Some(d) = state.devices.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": "unknown device",
                "device_id": id,
                "hint": "GET /api/devices lists the devices this instance aggregates"
            })),
        )
            .into_response();
    };
    let n = q.windows.unwrap_or(10);
    let all: Vec<&Window> = d.windows().collect();
    let windows: Vec<WindowOut<'_>> = all[all.len().saturating_sub(n)..]
        .iter()
        .map(|w| WindowOut {
            start: crate::reading::format_ts(w.start_ms),
            end: crate::reading::format_ts(w.end_ms),
            w,
        })
        .collect();
    let now = super::now_ms();
    Json(serde_json::json!({
        "device": summary(&id, d, state.is_online(d, now)),
        "windows": windows,
    }))
    .into_response()
}

/// Counters at a glance (cheap: no per-device work), for scripts and the demo.
async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let m = &shared.metrics;
    let (devices, online) = {
        let state = shared.state();
        (state.devices.len(), state.online(super::now_ms()))
    };
    Json(serde_json::json!({
        "consumed": m.consumed.get(),
        "applied": m.applied_count(),
        "devices": devices,
        "online": online,
        "assigned_partitions": m.assigned.get(),
    }))
    .into_response()
}
