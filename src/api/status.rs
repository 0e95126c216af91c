//! Read-only routes: `GET /status`, `GET /metrics` (Prometheus text, or the C++ original's JSON
//! with `Accept: application/json`) and `GET /samples?limit=N`.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::control::{DeviceView, combined_state};
use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::device::state::DeviceState;
use crate::sample::ProcessedSample;

/// Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Samples returned by `GET /samples` when no limit is given.
const DEFAULT_SAMPLES_LIMIT: usize = 100;

/// Room for a `/status` body with a few devices, so serialising rarely reallocates.
const STATUS_BODY_CAPACITY: usize = 2048;

/// `GET /status`: the whole gateway at a glance.
#[derive(Serialize, PartialEq, ToSchema)]
pub(super) struct StatusBody {
    /// The most severe device state.
    state: DeviceState,
    /// The newest processed sample, if any.
    latest_sample: Option<ProcessedSample>,
    /// The pipeline's counters.
    metrics: StatusMetrics,
    /// Every device, in configuration order.
    devices: Vec<DeviceView>,
    /// Seconds since the gateway started.
    uptime_seconds: u64,
    /// The gateway's version.
    #[schema(value_type = String)]
    version: &'static str,
    /// The uplink, present only when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    uplink: Option<crate::uplink::UplinkView>,
}

/// The pipeline's counters in `/status` (the C++ original's names).
#[derive(Serialize, PartialEq, ToSchema)]
struct StatusMetrics {
    /// Samples processed by the workers.
    samples_processed: u64,
    /// Samples the workers rejected (non-finite or out of range).
    samples_rejected: u64,
    /// Samples dropped, every reason together.
    samples_dropped: u64,
    /// Batches the workers ran.
    pool_jobs_processed: u64,
    /// Batches waiting for a worker.
    pool_jobs_queued: u64,
    /// Worker permits.
    pool_num_threads: usize,
    /// Samples in the ring buffer.
    queue_depth: u64,
    /// The ring buffer's capacity.
    queue_capacity: usize,
}

/// The last `/status` body and its JSON. Dashboards poll far more often than the pipeline
/// changes what `/status` shows, and comparing a freshly gathered body with the last one costs a
/// fraction of serialising it again (callgrind, docs/PERFORMANCE.md). Nothing can be stale:
/// every request gathers the body afresh, and any difference is serialised anew.
#[derive(Default)]
pub(super) struct StatusCache(Mutex<Option<(StatusBody, Bytes)>>);

impl StatusCache {
    /// The JSON of `body`, reusing the last serialisation when `body` equals the last one.
    ///
    /// Equality is `PartialEq`'s: a NaN never equals itself (a cache miss, nothing worse), and
    /// `0.0 == -0.0`, the one case where the reused JSON may spell a number differently from a
    /// fresh serialisation (`0.0` for `-0.0`), the same value to every JSON reader.
    fn json(&self, body: StatusBody) -> Bytes {
        if let Some((cached, json)) = self.lock().as_ref()
            && *cached == body
        {
            return json.clone();
        }
        // Serialised outside the lock, so concurrent misses do not queue behind each other.
        let mut json = Vec::with_capacity(STATUS_BODY_CAPACITY);
        // Serialising these plain structs into memory cannot fail.
        serde_json::to_writer(&mut json, &body).expect("status serialises");
        let json = Bytes::from(json);
        *self.lock() = Some((body, json.clone()));
        json
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(StatusBody, Bytes)>> {
        // Nothing panics while the lock is held; a poisoned cache is still a valid one.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `GET /status`.
#[utoipa::path(
    get,
    path = "/status",
    tag = "status",
    responses((status = 200, description = "The gateway's state", body = StatusBody))
)]
pub(super) async fn status(
    State(state): State<Arc<AppState>>,
    cache: Arc<StatusCache>,
) -> Response {
    // Built directly: `([(CONTENT_TYPE, ..)], bytes).into_response()` inserts a content type
    // for the bytes and then replaces it, two header-map inserts where one will do.
    let mut response = Response::new(Body::from(cache.json(status_body(&state))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// What `GET /status` shows, gathered now.
pub(super) fn status_body(state: &AppState) -> StatusBody {
    let ledger = state.buffer.ledger();
    let devices = state.devices.load();
    StatusBody {
        state: combined_state(&devices),
        latest_sample: state.worker.latest(),
        metrics: StatusMetrics {
            samples_processed: ledger.processed,
            samples_rejected: ledger.rejected.total(),
            samples_dropped: ledger.dropped.total(),
            pool_jobs_processed: ledger.batches,
            pool_jobs_queued: state.pool.queued(),
            pool_num_threads: state.workers,
            queue_depth: ledger.in_buffer,
            queue_capacity: state.buffer.capacity(),
        },
        devices: devices.iter().map(|d| DeviceView::new(state, d)).collect(),
        uptime_seconds: state.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION"),
        uplink: state.uplink.as_ref().map(|u| u.view()),
    }
}

/// `GET /metrics`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "status",
    responses((status = 200, description = "Prometheus text exposition (0.0.4); with \
        `Accept: application/json`, the C++ original's JSON. Compressed (gzip, zstd) when \
        the client accepts it", content(
        (String = "text/plain"),
        (MetricsJson = "application/json"),
    )))
)]
pub(super) async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let wants_json = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json"));
    if wants_json {
        return metrics_json(&state).into_response();
    }
    let ledger = state.buffer.ledger();
    let devices = state.devices.load();
    let counters: Vec<_> = devices.iter().map(|d| d.counters()).collect();
    crate::metrics::sync(&crate::metrics::ScrapeView {
        ledger,
        capacity: state.buffer.capacity(),
        uptime: state.started.elapsed(),
        devices: devices
            .iter()
            .zip(counters)
            .map(|(d, c)| (d.id().as_str(), c))
            .collect(),
        uplink: state.uplink.as_ref().map(|u| u.view()),
    });
    let mut body = state.prometheus.render();
    crate::metrics::render_process(&mut body);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

/// `GET /uplink`: the uplink's state, as in `/status`; 404 without an uplink.
#[utoipa::path(
    get,
    path = "/uplink",
    tag = "status",
    responses(
        (status = 200, description = "The uplink's state", body = crate::uplink::UplinkView),
        (status = 404, description = "No uplink is configured", body = ErrorBody),
    )
)]
pub(super) async fn uplink(State(state): State<Arc<AppState>>) -> Response {
    match &state.uplink {
        Some(uplink) => Json(uplink.view()).into_response(),
        None => ApiError::NotFound("no uplink is configured ([uplink] in the config)".to_owned())
            .into_response(),
    }
}

/// The C++ original's `/metrics` JSON.
#[derive(Serialize, ToSchema)]
pub(super) struct MetricsJson {
    /// Samples processed by the workers.
    samples_processed: u64,
    /// Samples dropped, every reason together.
    samples_dropped: u64,
    /// Samples in the ring buffer.
    queue_depth: u64,
    /// The 99th percentile of a batch's processing time, in milliseconds.
    latency_p99_ms: f64,
    /// Seconds since the gateway started.
    uptime_seconds: u64,
    /// The worker stage.
    thread_pool: ThreadPool,
}

/// The worker stage in [`MetricsJson`].
#[derive(Serialize, ToSchema)]
struct ThreadPool {
    /// Batches the workers ran.
    jobs_processed: u64,
    /// Batches waiting for a worker.
    jobs_queued: u64,
    /// Mean processing time of a batch, in milliseconds.
    avg_processing_ms: f64,
    /// Worker permits.
    num_threads: usize,
}

/// The C++ original's `/metrics` JSON, with real values.
fn metrics_json(state: &AppState) -> Json<MetricsJson> {
    let ledger = state.buffer.ledger();
    let totals = state.worker.totals();
    let avg_processing_ms = if totals.batches == 0 {
        0.0
    } else {
        totals.busy.as_secs_f64() * 1000.0 / totals.batches as f64
    };
    let p99_ms = state
        .worker
        .latency_quantile(0.99)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    Json(MetricsJson {
        samples_processed: ledger.processed,
        samples_dropped: ledger.dropped.total(),
        queue_depth: ledger.in_buffer,
        latency_p99_ms: p99_ms,
        uptime_seconds: state.started.elapsed().as_secs(),
        thread_pool: ThreadPool {
            jobs_processed: ledger.batches,
            jobs_queued: state.pool.queued(),
            avg_processing_ms,
            num_threads: state.workers,
        },
    })
}

/// The query of `GET /samples`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct SamplesQuery {
    /// How many of the newest samples, 1 to the `history` setting (default 100, or
    /// `history` if smaller).
    #[param(minimum = 1)]
    limit: Option<usize>,
}

/// `GET /samples`: the newest processed samples, oldest first.
#[derive(Serialize, ToSchema)]
pub(super) struct SamplesBody {
    /// How many samples follow.
    count: usize,
    /// The samples, oldest first.
    samples: Vec<ProcessedSample>,
}

/// `GET /samples?limit=N`.
#[utoipa::path(
    get,
    path = "/samples",
    tag = "samples",
    params(SamplesQuery),
    responses(
        (status = 200, description = "The newest processed samples, oldest first. Compressed \
            (gzip, zstd) when the client accepts it", body = SamplesBody),
        (status = 400, description = "`limit` is not a number from 1 to `history`, or the \
            query has another parameter", body = ErrorBody),
    )
)]
pub(super) async fn samples(
    State(state): State<Arc<AppState>>,
    query: Result<Query<SamplesQuery>, QueryRejection>,
) -> Result<Json<SamplesBody>, ApiError> {
    let Query(query) = query?;
    let max = state.worker.history_len();
    let limit = query.limit.unwrap_or(DEFAULT_SAMPLES_LIMIT.min(max));
    if !(1..=max).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {max}, got {limit}"
        )));
    }
    let samples = state.worker.recent(limit);
    Ok(Json(SamplesBody {
        count: samples.len(),
        samples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(processed: u64) -> StatusBody {
        StatusBody {
            state: DeviceState::Measuring,
            latest_sample: None,
            metrics: StatusMetrics {
                samples_processed: processed,
                samples_rejected: 0,
                samples_dropped: 0,
                pool_jobs_processed: 0,
                pool_jobs_queued: 0,
                pool_num_threads: 2,
                queue_depth: 0,
                queue_capacity: 1000,
            },
            devices: Vec::new(),
            uptime_seconds: 1,
            version: "test",
            uplink: None,
        }
    }

    fn processed(json: &[u8]) -> u64 {
        let value: serde_json::Value = serde_json::from_slice(json).unwrap();
        value["metrics"]["samples_processed"].as_u64().unwrap()
    }

    #[test]
    fn the_status_cache_reuses_equal_bodies_and_never_serves_a_stale_one() {
        let cache = StatusCache::default();
        let first = cache.json(body(1));
        let again = cache.json(body(1));
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "an equal body reuses the JSON"
        );
        let changed = cache.json(body(2));
        assert_eq!(processed(&first), 1);
        assert_eq!(processed(&changed), 2);
        assert_eq!(processed(&cache.json(body(1))), 1);
    }
}
