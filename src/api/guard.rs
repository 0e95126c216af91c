//! The request guard: what tower-http does not do as well, in two parts that allocate
//! nothing of their own per request: [`GuardService`] around the whole router (404s and 405s
//! included) and [`Access`] (CSRF, token, declared size) around each route's handlers.
//!
//! - **Load shedding with probes exempt**: a bound on requests in progress, refusing the
//!   excess at once with 503 and `Retry-After`, but never `/healthz` or `/readyz`, which an
//!   orchestrator must reach under overload. tower's `ConcurrencyLimit` queues instead of
//!   refusing, and `LoadShed` cannot exempt a route.
//! - **Bearer-token authentication compared in constant time** (401 with `WWW-Authenticate`)
//!   for state-changing routes, and for reads too when `protect_reads` is set (except the
//!   probes and the static live page, whose data requests carry the token). tower-http's
//!   `ValidateRequestHeaderLayer::bearer` compares with `==`, which leaks the token's prefix
//!   through timing. The token is taken only from the `Authorization` header (never from a
//!   URL), and never logged: that header is marked sensitive in [`super::layers`].
//! - **The CSRF and DNS-rebinding check** (403) on state-changing requests sent by a browser
//!   for a page of another origin or under a foreign host name; tower-http has none.
//! - An early 413 for a declared body over the limit, the request timeout (408; never for
//!   `POST /-/reload`, whose outcome it would leave unknown) and a
//!   handler panic turned into a 500, each as the API's JSON error body with the request id
//!   (tower-http's `RequestBodyLimit`, `Timeout` and `CatchPanic` answer in plain text or
//!   empty bodies, and box the body or the future on every request), and the request
//!   counted by method, matched route and status, refusals included.
//! - **The request's tracing span**, entered around the handler (see [`super::layers`] for why
//!   not tower-http's `TraceLayer`).
//! - **The request id**, kept or made ([`super::layers::request_id`]) and written on the response:
//!   tower-http's request-id layers cost more and did less (see [`super::layers`]).
//!
//! What tower-http does well is done by tower-http, outside the guard: sensitive headers and
//! compression ([`super::layers`]).
//!
//! All of it follows a live reload: both parts load the guard from a [`Swap`] per request.

use std::convert::Infallible;
use std::future::{Future, Ready};
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Timeout;
use tower::{Layer, Service};

use super::ApiError;
use super::layers::RequestIds;
use crate::config::{HttpSettings, Secret};
use crate::swap::Swap;

/// Seconds a shed or backpressured client is told to wait.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// What the guard enforces.
pub struct Guard {
    in_progress: Arc<Semaphore>,
    timeout: Duration,
    token: Option<Secret>,
    protect_reads: bool,
    body_limit: u64,
    allowed_hosts: Vec<String>,
}

impl Guard {
    /// A guard for these HTTP settings.
    pub fn new(http: &HttpSettings) -> Self {
        Self {
            in_progress: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            timeout: http.request_timeout(),
            token: http.api_token.clone(),
            protect_reads: http.protect_reads,
            body_limit: http.body_limit_bytes as u64,
            allowed_hosts: http.allowed_hosts.clone(),
        }
    }

    /// Whether a request with this method to this path needs the bearer token (the OpenAPI
    /// document asks the same question of every operation).
    pub(super) fn needs_token(&self, method: &Method, path: &str) -> bool {
        self.token.is_some()
            && (!is_read(method) || (self.protect_reads && !is_probe(path) && !is_live_page(path)))
    }

    /// Whether a browser sends this request on behalf of a page that is not the gateway's own
    /// (cross-site request forgery, or DNS rebinding: a foreign name resolving to us).
    ///
    /// Browsers say where a request comes from (`Sec-Fetch-Site`, `Origin`); clients that are
    /// not browsers send neither and are not affected. A browser's request must come from the
    /// origin it is sent to, under a host that is an IP address, `localhost`, or one of
    /// `allowed_hosts`.
    fn sent_for_a_foreign_page(&self, request: &Request) -> bool {
        let headers = request.headers();
        let fetch_site = headers.get("sec-fetch-site");
        let origin = headers.get(header::ORIGIN);
        if fetch_site.is_none() && origin.is_none() {
            return false;
        }
        if fetch_site.is_some_and(|site| site != "same-origin" && site != "none") {
            return true;
        }
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return true;
        };
        let same_origin = origin.is_none_or(|origin| {
            origin.to_str().is_ok_and(|origin| {
                origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    .is_some_and(|authority| authority.eq_ignore_ascii_case(host))
            })
        });
        !same_origin || !self.host_allowed(host)
    }

    /// Whether `host` (a `Host` header, with or without a port) names this gateway.
    fn host_allowed(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            // An IPv6 literal.
            Some(rest) => {
                return rest
                    .split_once(']')
                    .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
            }
            None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
        };
        name.parse::<std::net::Ipv4Addr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
    }

    /// A body declared larger than the limit is refused before it is read, so a client cannot
    /// hold a request slot by announcing a huge body and sending nothing.
    fn declared_too_large(&self, request: &Request) -> bool {
        request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|length| length > self.body_limit)
    }

    /// Lets the request in, holding a slot of the concurrency bound (none for a probe when
    /// every slot is taken), or says why not.
    fn admit(&self, path: &str) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        let permit = self.in_progress.clone().try_acquire_owned().ok();
        if permit.is_none() && !is_probe(path) {
            return Err(Refusal::Busy);
        }
        Ok(permit)
    }

    /// Bounds the body a handler can read to the limit, for bodies that declared no length
    /// (chunked) or lied about it: reading past the limit fails, and axum's extractors answer
    /// that with 413. Done here rather than with axum's `DefaultBodyLimit`, whose limit is fixed
    /// when the router is built, so a live reload can change it. Requests without a body (every
    /// read) are left alone and allocate nothing.
    ///
    /// axum's own default limit (2 MiB) is disabled here too, on the requests that have a body
    /// only: a `DefaultBodyLimit::disable()` layer around the router would store its setting in
    /// the extensions of every request, reads included.
    fn limit_body(&self, request: Request) -> Request {
        if request.body().is_end_stream() {
            return request;
        }
        let limit = usize::try_from(self.body_limit).unwrap_or(usize::MAX);
        let mut request = request.map(|body| Body::new(http_body_util::Limited::new(body, limit)));
        DefaultBodyLimit::disable().apply(&mut request);
        request
    }

    /// Whether a request that a route and method matched may reach its handler: not sent for
    /// a foreign page if it changes state, with the token where one is needed, and a declared
    /// body within the limit (checked last, so a client without the token learns nothing of
    /// the limit).
    fn check_access(&self, request: &Request) -> Result<(), Refusal> {
        if !is_read(request.method()) && self.sent_for_a_foreign_page(request) {
            return Err(Refusal::CrossSite);
        }
        if self.needs_token(request.method(), request.uri().path()) && !self.authorized(request) {
            return Err(Refusal::Unauthorized);
        }
        if self.declared_too_large(request) {
            return Err(Refusal::TooLarge(self.body_limit));
        }
        Ok(())
    }

    fn authorized(&self, request: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| bearer_credentials(value.as_bytes()))
            .is_some_and(|candidate| token.matches(candidate))
    }
}

/// Why the guard refused a request.
enum Refusal {
    /// Every request slot is taken.
    Busy,
    /// A token is needed and the right one was not given.
    Unauthorized,
    /// The declared body is larger than this limit.
    TooLarge(u64),
    /// A browser sends it for a page of another origin.
    CrossSite,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Busy => with_retry_after(ApiError::Unavailable(
                "too many requests in progress; retry shortly".to_owned(),
            )),
            Refusal::Unauthorized => {
                let mut response = ApiError::Rejected(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token".to_owned(),
                )
                .into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"telemetryhub\""),
                );
                response
            }
            Refusal::CrossSite => ApiError::Rejected(
                StatusCode::FORBIDDEN,
                "a web page of another origin may not change the gateway; \
                 add its host to http.allowed_hosts if it is this gateway's own name"
                    .to_owned(),
            )
            .into_response(),
            Refusal::TooLarge(limit) => ApiError::Rejected(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes"),
            )
            .into_response(),
        }
    }
}

/// Reads change nothing.
pub(super) fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// Whether `route` has the request timeout. Not `POST /-/reload`: a reload queued or applying
/// runs to its end whatever happens to the request (it is not cancelled with it), so a 408
/// would say "failed" of a reload that may yet apply. Its length is bounded anyway: a reload
/// waits at most a few seconds for the devices it retires, and reloads are serialised.
pub(super) fn has_timeout(route: &str) -> bool {
    route != "/-/reload"
}

/// The request timeout of `route`: `timeout`, or none (see [`has_timeout`]).
fn timeout_of(route: &str, timeout: Duration) -> Duration {
    if has_timeout(route) {
        timeout
    } else {
        // `tokio::time::timeout` sets no timer for a deadline past the end of time.
        Duration::MAX
    }
}

/// Orchestrators probe these; they are never shed or token-protected.
pub(super) fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// The live page itself (not its data): static markup and script, the same for everyone, with
/// no telemetry in it. A browser cannot send a bearer token when it loads a page, so the page
/// loads without one and sends the token, once the user has given it, on its own requests
/// (`/events` and the controls), which the token protects like every other route.
fn is_live_page(path: &str) -> bool {
    path == "/"
}

/// The credentials of `Bearer <credentials>`; the scheme name is case-insensitive (RFC 9110).
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, credentials) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then_some(credentials)
}

/// The access check (CSRF and host, bearer token, declared body size), put on each route's
/// handlers with [`Access::check`], inside the method routing, so that a method the route does
/// not have is a 405 with or without the token, never a 401. (`Router::route_layer` would not
/// do: in axum 0.8 it wraps the 405 fallback too.) It refuses, or passes the request on
/// untouched; its refusals come back out through [`GuardService`], which counts them and
/// writes the request id into them.
///
/// A wrapper of the handler rather than a `MethodRouter::route_layer`: axum boxes a layered
/// route and clones the box, the layer and the route inside it on every request (callgrind,
/// docs/PERFORMANCE.md), where a wrapped handler is the route's one boxed service.
#[derive(Clone)]
pub struct Access {
    guard: Arc<Swap<Guard>>,
}

impl Access {
    /// The access check of whichever guard `guard` holds when a request arrives.
    pub fn new(guard: Arc<Swap<Guard>>) -> Self {
        Self { guard }
    }

    /// `handler`, called only for requests the access check lets through.
    pub fn check<H>(&self, handler: H) -> Checked<H> {
        Checked {
            guard: self.guard.clone(),
            handler,
        }
    }
}

/// A handler behind the access check (see [`Access`]).
#[derive(Clone)]
pub struct Checked<H> {
    guard: Arc<Swap<Guard>>,
    handler: H,
}

impl<H, T, S> Handler<T, S> for Checked<H>
where
    H: Handler<T, S>,
{
    type Future = Either<Ready<Response>, H::Future>;

    fn call(self, request: Request, state: S) -> Self::Future {
        let guard = self.guard.load();
        match guard.check_access(&request) {
            Ok(()) => Either::Right(self.handler.call(guard.limit_body(request), state)),
            Err(refusal) => Either::Left(std::future::ready(refusal.into_response())),
        }
    }
}

/// The guard as a tower layer around the router (404s and 405s included).
///
/// A hand-written service rather than `axum::middleware::from_fn` plus tower-http's
/// `CatchPanicLayer`: those clone the inner service into a box, box a future and box the
/// response body on every request, about a third of the instructions of a `GET /status`
/// (callgrind, docs/PERFORMANCE.md). This does the same work with no allocation of its own,
/// except boxing the body limit around a request that has a body (see `Guard::limit_body`).
///
/// The guard sits in a [`Swap`]: a live reload replaces it whole (token, hosts, limits,
/// timeout), and each request is judged by the guard it loaded when it arrived. A new
/// `max_concurrent_requests` comes with a new semaphore, so requests admitted under the old
/// bound finish holding the old one's slots: for as long as they run, the two bounds add up.
#[derive(Clone)]
pub struct GuardLayer {
    guard: Arc<Swap<Guard>>,
    ids: RequestIds,
}

impl GuardLayer {
    /// A layer enforcing whichever guard `guard` holds when a request arrives, and giving
    /// requests ids from one sequence of its own (which a live reload does not restart).
    pub fn new(guard: Arc<Swap<Guard>>) -> Self {
        Self {
            guard,
            ids: RequestIds::new(),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            guard: self.guard.clone(),
            ids: self.ids.clone(),
            inner,
        }
    }
}

/// The service [`GuardLayer`] wraps a route in: gives the request its id (see
/// [`request_id`](super::layers::request_id)), refuses what the guard refuses, bounds the
/// request's time, turns a panicking handler into a 500, writes the request id into error
/// bodies and onto every response, and counts every request by method, matched route (never
/// the raw path) and status, refusals included.
///
/// axum clones it for every request, so the guard is behind an `Arc` (the token is not copied).
#[derive(Clone)]
pub struct GuardService<S> {
    guard: Arc<Swap<Guard>>,
    ids: RequestIds,
    inner: S,
}

impl<S, B> Service<axum::http::Request<B>> for GuardService<S>
where
    S: Service<axum::http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let request_id = super::layers::request_id(request.headers(), &self.ids);
        let route = super::route_label(request.uri().path());
        let span = super::layers::request_span(request.method(), route, &request_id);
        let _entered = span.enter();
        super::layers::log_request(request.headers());
        let record = Record {
            started: Instant::now(),
            method: request.method().clone(),
            route,
            request_id: Some(request_id),
        };
        let guard = self.guard.load();
        let state = match guard.admit(request.uri().path()) {
            Err(refusal) => Stage::Answer {
                response: Some(refusal.into_response()),
            },
            Ok(permit) => {
                // A handler that panics before returning its future is caught here, the one
                // that panics while running in `GuardFuture::poll`.
                match panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
                    Ok(future) => Stage::Running {
                        future: tokio::time::timeout(timeout_of(route, guard.timeout), future),
                        timeout: guard.timeout,
                        _permit: permit,
                    },
                    Err(panic) => Stage::Answer {
                        response: Some(super::error::panic_response(panic)),
                    },
                }
            }
        };
        drop(_entered);
        GuardFuture {
            stage: state,
            record,
            span,
        }
    }
}

/// What the request is counted as.
struct Record {
    started: Instant,
    method: Method,
    route: &'static str,
    /// Taken when the response is ready, to stamp error bodies and to go on the response.
    request_id: Option<HeaderValue>,
}

pin_project! {
    /// The future of [`GuardService`].
    pub struct GuardFuture<F> {
        #[pin]
        stage: Stage<F>,
        record: Record,
        // The request's span, entered on every poll.
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        // A response to hand out (a refusal), or none once the future has completed.
        Answer { response: Option<Response> },
        Running {
            #[pin]
            future: Timeout<F>,
            timeout: Duration,
            // Held until the response is ready: the request counts against the bound.
            _permit: Option<OwnedSemaphorePermit>,
        },
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let mut response = match this.stage.as_mut().project() {
            StageProj::Answer { response } => response
                .take()
                .expect("a GuardFuture is not polled after it completed"),
            StageProj::Running {
                future, timeout, ..
            } => match panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                Err(panic) => super::error::panic_response(panic),
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(Ok(Ok(response)))) => response,
                Ok(Poll::Ready(Ok(Err(never)))) => match never {},
                Ok(Poll::Ready(Err(_elapsed))) => ApiError::Rejected(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request took longer than {timeout:?}"),
                )
                .into_response(),
            },
        };
        // Never poll the handler again (after a timeout or a panic it could still answer), and
        // free the request's slot now rather than whenever the future is dropped.
        this.stage.set(Stage::Answer { response: None });
        let record = &mut *this.record;
        if let Some(id) = record.request_id.take() {
            super::error::stamp_request_id(&mut response, &id);
            // The id goes back on every response, refusals, timeouts and panics included (a
            // handler's own `x-request-id` is left alone). Done here rather than by tower-http's
            // `PropagateRequestIdLayer`, which wraps the future once more and stores a second
            // copy of the id in the response's extensions (a map allocated for it alone).
            if let header::Entry::Vacant(entry) =
                response.headers_mut().entry(super::layers::REQUEST_ID)
            {
                entry.insert(id);
            }
        }
        let elapsed = record.started.elapsed();
        tracing::debug!(
            status = response.status().as_u16(),
            micros = elapsed.as_micros() as u64,
            "Request finished."
        );
        crate::metrics::http_request(&record.method, record.route, response.status(), elapsed);
        Poll::Ready(Ok(response))
    }
}

/// An error response telling the client when to retry.
pub fn with_retry_after(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::routing::{MethodRouter, get};
    use tower::ServiceExt;

    use super::*;

    /// `guard` in the cell the layers load it from.
    fn live(guard: Guard) -> Arc<Swap<Guard>> {
        Arc::new(Swap::new(Arc::new(guard)))
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
        assert_eq!(bearer_credentials(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"Basic abcdef"), None);
        assert_eq!(bearer_credentials(b"Bearer"), None);
    }

    /// The routes `routes` makes, their handlers behind the access check it is given, behind
    /// the guard of `http`, as the API's router puts them.
    fn guarded(
        routes: impl FnOnce(&Access) -> Vec<(&'static str, MethodRouter)>,
        http: &HttpSettings,
    ) -> Router {
        let guard = live(Guard::new(http));
        routes(&Access::new(guard.clone()))
            .into_iter()
            .fold(Router::new(), |router, (path, handlers)| {
                router.route(path, handlers)
            })
            .layer(GuardLayer::new(guard))
    }

    fn router(http: &HttpSettings) -> Router {
        let routes = |access: &Access| {
            vec![
                ("/status", get(access.check(|| async { "fine" }))),
                (
                    "/panics",
                    get(access.check(|| async {
                        if true {
                            panic!("a handler bug");
                        }
                        "unreachable"
                    })),
                ),
                (
                    "/slow",
                    get(access.check(|| async {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        "late"
                    })),
                ),
            ]
        };
        guarded(routes, http)
    }

    async fn get_status(router: &Router, path: &str) -> (StatusCode, String) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    type Headers<'a> = &'a [(&'a str, &'a str)];

    /// The status of `POST /start` with these headers, through the guard.
    async fn post_with(http: &HttpSettings, headers: &[(&str, &str)]) -> StatusCode {
        let router = guarded(
            |access| {
                vec![(
                    "/start",
                    axum::routing::post(access.check(|| async { "started" })),
                )]
            },
            http,
        );
        let mut request = Request::post("/start");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::empty()).unwrap();
        router.oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn browsers_may_post_only_from_the_gateways_own_page_under_a_name_it_knows() {
        let http = HttpSettings::default();
        let host = ("host", "127.0.0.1:8080");
        let cases: &[(Headers, StatusCode, &str)] = &[
            (
                &[host],
                StatusCode::OK,
                "curl: no Origin, no Sec-Fetch-Site",
            ),
            (
                &[
                    host,
                    ("origin", "http://127.0.0.1:8080"),
                    ("sec-fetch-site", "same-origin"),
                ],
                StatusCode::OK,
                "the live page",
            ),
            (
                &[
                    ("host", "localhost:8080"),
                    ("origin", "http://localhost:8080"),
                ],
                StatusCode::OK,
                "the live page under localhost",
            ),
            (
                &[("host", "[::1]:8080"), ("origin", "http://[::1]:8080")],
                StatusCode::OK,
                "the live page under an IPv6 address",
            ),
            (
                &[host, ("origin", "https://evil.example")],
                StatusCode::FORBIDDEN,
                "another site's page",
            ),
            (
                &[host, ("origin", "null")],
                StatusCode::FORBIDDEN,
                "an opaque origin",
            ),
            (
                &[host, ("sec-fetch-site", "cross-site")],
                StatusCode::FORBIDDEN,
                "a cross-site fetch without Origin",
            ),
            (
                &[
                    host,
                    ("origin", "http://127.0.0.1:3000"),
                    ("sec-fetch-site", "same-site"),
                ],
                StatusCode::FORBIDDEN,
                "another port of this host (Grafana, say)",
            ),
            (
                &[
                    ("host", "rebind.example:8080"),
                    ("origin", "http://rebind.example:8080"),
                    ("sec-fetch-site", "same-origin"),
                ],
                StatusCode::FORBIDDEN,
                "DNS rebinding: a foreign name resolving to the gateway",
            ),
        ];
        for (headers, expected, what) in cases {
            assert_eq!(post_with(&http, headers).await, *expected, "{what}");
        }
        let named = HttpSettings {
            allowed_hosts: vec!["Gateway.LAN".to_owned()],
            ..HttpSettings::default()
        };
        let behind_a_proxy = [
            ("host", "gateway.lan"),
            ("origin", "https://gateway.lan"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(post_with(&named, &behind_a_proxy).await, StatusCode::OK);
        assert_eq!(
            post_with(&http, &behind_a_proxy).await,
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn a_body_over_axums_default_limit_is_read_up_to_the_guards_own() {
        let http = HttpSettings {
            body_limit_bytes: 4 << 20,
            ..HttpSettings::default()
        };
        let router = guarded(
            |access| {
                vec![(
                    "/upload",
                    axum::routing::post(
                        access
                            .check(|body: axum::body::Bytes| async move { body.len().to_string() }),
                    ),
                )]
            },
            &http,
        );
        let upload = |len: usize| {
            let request = Request::post("/upload")
                .body(Body::from(vec![b'x'; len]))
                .unwrap();
            router.clone().oneshot(request)
        };
        // Over axum's 2 MiB default, within the guard's limit.
        let response = upload(3 << 20).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = to_bytes(response.into_body(), 64).await.unwrap();
        assert_eq!(&body[..], (3usize << 20).to_string().as_bytes());
        // Over the guard's limit (no length declared: refused while reading).
        let response = upload(5 << 20).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_foreign_page_may_still_read() {
        let router = router(&HttpSettings::default());
        let request = Request::get("/status")
            .header("origin", "https://evil.example")
            .header("sec-fetch-site", "cross-site")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            router.oneshot(request).await.unwrap().status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_500_json_and_the_next_request_is_served() {
        let router = router(&HttpSettings::default());
        let (status, body) = get_status(&router, "/panics").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["error"], "internal error", "{body}");
        assert!(body["request_id"].is_string(), "{body}");
        assert_eq!(get_status(&router, "/status").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_slot_is_freed_when_the_response_is_ready_not_when_the_future_is_dropped() {
        let http = HttpSettings {
            max_concurrent_requests: 1,
            ..HttpSettings::default()
        };
        let mut service =
            GuardLayer::new(live(Guard::new(&http))).layer(tower::service_fn(|_: Request| async {
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }));
        let request = || Request::get("/status").body(Body::empty()).unwrap();
        let mut first = Box::pin(service.call(request()));
        assert_eq!((&mut first).await.unwrap().status(), StatusCode::OK);
        // `first` is still alive; the one slot must be free all the same.
        let second = service.call(request()).await.unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_over_the_timeout_is_a_408_and_frees_its_slot() {
        let http = HttpSettings {
            request_timeout_ms: 50,
            max_concurrent_requests: 1,
            ..HttpSettings::default()
        };
        let router = router(&http);
        let (status, body) = get_status(&router, "/slow").await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
        assert!(body.contains("took longer than"), "{body}");
        // The one slot was released with the timed-out request.
        assert_eq!(get_status(&router, "/status").await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_is_never_cut_short_by_the_request_timeout() {
        let http = HttpSettings {
            request_timeout_ms: 50,
            ..HttpSettings::default()
        };
        // A reload slower than the timeout (it waits for devices to push what they read).
        let router = guarded(
            |access| {
                vec![(
                    "/-/reload",
                    get(access.check(|| async {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        "applied"
                    })),
                )]
            },
            &http,
        );
        assert_eq!(
            get_status(&router, "/-/reload").await,
            (StatusCode::OK, "applied".to_owned())
        );
    }
}
