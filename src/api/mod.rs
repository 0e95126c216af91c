//! The HTTP API: REST control of the devices, status, samples, health, Prometheus metrics, and
//! a live page (`GET /`, fed by server-sent events from `GET /events`), and `POST /-/reload`
//! (live reload of the configuration, through [`crate::reload::ReloadHandle`]).
//!
//! [`router`] builds the axum `Router` from an [`AppState`], which holds only handle types the
//! pipeline stages export (device handles, the buffer's accounting, the worker's statistics);
//! the API never reaches into `app`. Routes and JSON field names follow the C++ original so its
//! clients keep working. Every error is a JSON `{"error": ..., "request_id": ...}` body.
//!
//! Around the routes, from the outside in: `Authorization` marked sensitive ([`layers`]), then
//! the hand-written [`Guard`], which gives the request its id (the client's, or one it makes,
//! see [`layers`]), enters the request's tracing span and puts the id back on the response.
//! `GET /openapi.json` describes all of it ([`openapi`]).

mod control;
mod error;
mod guard;
mod health;
pub mod ingest;
mod layers;
mod live;
mod openapi;
mod reload;
mod server;
mod status;

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::Router;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};

pub use self::error::ApiError;
pub use self::guard::{Guard, GuardService};
pub use self::ingest::IngestLimits;
pub use self::server::{serve, serve_live};
use crate::buffer::RingBuffer;
use crate::device::DeviceHandle;
use crate::dispatch::PoolGauges;
use crate::pipeline::DevicesSettled;
use crate::reload::ReloadHandle;
use crate::swap::Swap;
use crate::worker::Worker;

/// Everything the handlers need; the router shares it behind one `Arc`.
pub struct AppState {
    /// The devices, in configuration order; a live reload replaces the list.
    pub devices: Arc<Swap<[DeviceHandle]>>,
    /// Waits out a live reload changing the devices (a command that met a task the reload
    /// ended then finds the device's new task, or that it is gone).
    pub devices_settled: DevicesSettled,
    /// The ring buffer (for its accounting and depth).
    pub buffer: Arc<RingBuffer>,
    /// The worker stage (statistics, history, latency).
    pub worker: Arc<Worker>,
    /// Batches queued and running on the worker stage.
    pub pool: Arc<PoolGauges>,
    /// Worker permits.
    pub workers: usize,
    /// The Prometheus recorder's handle.
    pub prometheus: PrometheusHandle,
    /// Cancelled when shutdown begins; `/readyz` then answers 503.
    pub shutdown: CancellationToken,
    /// When the gateway started.
    pub started: Instant,
    /// `POST /samples` limits; a live reload replaces them.
    pub ingest: Arc<Swap<IngestLimits>>,
    /// The uplink, when one is configured.
    pub uplink: Option<crate::uplink::UplinkHandle>,
    /// Live reload (`POST /-/reload`); `None` when the gateway has no config source to re-read.
    pub reload: Option<ReloadHandle>,
}

impl AppState {
    fn device(&self, id: &str) -> Result<DeviceHandle, ApiError> {
        self.devices
            .load()
            .iter()
            .find(|d| d.id() == id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("unknown device `{id}`")))
    }
}

/// Every route pattern, as metric labels use them.
const ROUTES: [&str; 19] = [
    "/",
    "/-/reload",
    "/openapi.json",
    "/uplink",
    "/events",
    "/status",
    "/metrics",
    "/samples",
    "/start",
    "/stop",
    "/reset",
    "/devices",
    "/devices/{id}",
    "/devices/{id}/start",
    "/devices/{id}/stop",
    "/devices/{id}/reset",
    "/devices/{id}/command",
    "/healthz",
    "/readyz",
];

/// The route label of a request path: the route pattern it matches (what axum's router
/// matches it to, by the same `matchit` rules), else `"unmatched"`. A static string, so
/// recording a request allocates nothing, and an unknown path can never become a label.
///
/// Computed from the path rather than read from axum's `MatchedPath`, because the guard runs
/// outside the router (see [`router`]).
fn route_label(path: &str) -> &'static str {
    static PATTERNS: LazyLock<matchit::Router<&'static str>> = LazyLock::new(|| {
        let mut patterns = matchit::Router::new();
        for route in ROUTES {
            patterns
                .insert(route, route)
                .expect("the route patterns are valid and distinct");
        }
        patterns
    });
    // Most requests are for a route without parameters: a comparison finds those, where
    // matchit's lookup costs about 290 instructions (callgrind, `GET /status`).
    if let Some(route) = ROUTES.iter().find(|r| **r == path) {
        return route;
    }
    PATTERNS
        .at(path)
        .map_or("unmatched", |matched| *matched.value)
}

/// The API as hyper serves it: the routes behind the guard, behind `Authorization` marked
/// sensitive.
pub type Api = SetSensitiveRequestHeaders<GuardService<Router>>;

/// The API's routes, behind the request guard and body limit.
///
/// The guard and the sensitive-headers layer wrap the router as a whole, not each route
/// (`Router::layer`): a layered route is boxed again inside the router and cloned, with its
/// future boxed, on every request, about 1,300 instructions of a `GET /status` (callgrind,
/// docs/PERFORMANCE.md). The guard then labels requests from their path ([`route_label`]).
///
/// Each route's handlers go through `access.check`, which puts the guard's access check on them
/// (see [`guard::Access`]); a route added without it fails the test that sends every
/// documented operation without the token. Compression is a layer of the three routes with
/// large bodies only, so the others (the hot `/status` above all) never pass through it.
///
/// The body limit is the guard's (see [`Guard`]), which also disables axum's own default limit
/// on the requests that have a body.
pub fn router(state: AppState, guard: Arc<Swap<Guard>>) -> Api {
    let status_cache = Arc::new(status::StatusCache::default());
    let document = Arc::new(openapi::Document::new(guard.clone()));
    let access = guard::Access::new(guard.clone());
    let routes = Router::new()
        .route("/", get(access.check(live::page)))
        .route("/events", get(access.check(live::events)))
        .route(
            "/status",
            get(access.check(move |state| status::status(state, status_cache.clone()))),
        )
        .route(
            "/metrics",
            get(access.check(status::metrics)).layer(layers::compression()),
        )
        .route("/uplink", get(access.check(status::uplink)))
        .route(
            "/samples",
            get(access.check(status::samples))
                .layer(layers::compression())
                .post(access.check(ingest::ingest)),
        )
        .route("/start", post(access.check(control::start_all)))
        .route("/stop", post(access.check(control::stop_all)))
        .route("/reset", post(access.check(control::reset_all)))
        .route("/devices", get(access.check(control::list_devices)))
        .route("/devices/{id}", get(access.check(control::get_device)))
        .route(
            "/devices/{id}/start",
            post(access.check(control::start_one)),
        )
        .route("/devices/{id}/stop", post(access.check(control::stop_one)))
        .route(
            "/devices/{id}/reset",
            post(access.check(control::reset_one)),
        )
        .route(
            "/devices/{id}/command",
            post(access.check(control::send_command)),
        )
        .route("/-/reload", post(access.check(reload::reload)))
        .route("/healthz", get(access.check(health::healthz)))
        .route("/readyz", get(access.check(health::readyz)))
        .route(
            "/openapi.json",
            get(access.check(move |state| openapi::serve(state, document.clone())))
                .layer(layers::compression()),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::new(state));
    ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new(
            layers::SENSITIVE_HEADERS,
        ))
        .layer(guard::GuardLayer::new(guard))
        .service(routes)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use axum::extract::MatchedPath;
    use axum::http::Request;
    use axum::routing::any;
    use tower::ServiceExt;

    use super::*;

    /// The guard's label of a path is the pattern axum's router matches it to.
    #[tokio::test]
    async fn a_paths_label_is_the_route_axum_matches_it_to() {
        let matched = ROUTES
            .iter()
            .fold(Router::new(), |router, route| {
                router.route(
                    route,
                    any(|path: MatchedPath| async move { path.as_str().to_owned() }),
                )
            })
            .fallback(|| async { "unmatched" });
        let paths = [
            "/",
            "/status",
            "/metrics",
            "/samples",
            "/-/reload",
            "/openapi.json",
            "/devices",
            "/devices/sim0",
            "/devices/a%20b/start",
            "/devices/x/stop",
            "/devices/x/reset",
            "/devices/x/command",
            "/devices/",
            "/devices//start",
            "/devices/x/y",
            "/status/",
            "/Status",
            "/nope",
            "/devices/x/start/more",
            "/healthz",
            "/readyz",
            "/events",
            "/uplink",
            "/start",
            "/stop",
            "/reset",
        ];
        for path in paths {
            let request = Request::get(path).body(Body::empty()).unwrap();
            let response = matched.clone().oneshot(request).await.unwrap();
            let body = to_bytes(response.into_body(), 1024).await.unwrap();
            assert_eq!(
                route_label(path),
                std::str::from_utf8(&body).unwrap(),
                "{path}"
            );
        }
        for route in ROUTES {
            let concrete = route.replace("{id}", "dev-1");
            assert_eq!(route_label(&concrete), route, "{concrete}");
        }
    }
}
