//! Access control: the auth matrix over every route of the router (no token, wrong tokens, the
//! right token), with reads open and with `protect_reads`; refused requests change nothing;
//! the token never shows in answers, logs or the stats file.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    Binary, DEADLINE, TestApp, assert_stats_balanced, json_of, spawn_app, u64_at, wait_until,
};

/// The token the protected apps are configured with.
const TOKEN: &str = "s3cret-Tok3n_for-tests";

/// A sample body for `POST /samples`; its value is one the device never sends.
fn ingest_body(value: f64) -> Value {
    json!([{ "device": "sim0", "value": value, "unit": "V" }])
}

/// One route and a request on it that succeeds when authorised.
struct Route {
    method: Method,
    path: &'static str,
    body: Option<Value>,
    /// Statuses an authorised request may get (readiness may be 503 while a device warms up).
    ok: &'static [u16],
}

fn route(method: Method, path: &'static str, ok: &'static [u16]) -> Route {
    Route {
        method,
        path,
        body: None,
        ok,
    }
}

/// Every route in `src/api/mod.rs`, in an order where each authorised request is legal: the
/// device command needs an open link, a device reset needs a stopped device.
fn every_route() -> Vec<Route> {
    vec![
        route(Method::GET, "/status", &[200]),
        route(Method::GET, "/metrics", &[200]),
        route(Method::GET, "/samples", &[200]),
        route(Method::GET, "/devices", &[200]),
        route(Method::GET, "/devices/sim0", &[200]),
        route(Method::GET, "/healthz", &[200]),
        route(Method::GET, "/readyz", &[200, 503]),
        Route {
            body: Some(json!({ "command": "GET_STATUS" })),
            ..route(Method::POST, "/devices/sim0/command", &[200])
        },
        Route {
            body: Some(ingest_body(1.5)),
            ..route(Method::POST, "/samples", &[202])
        },
        route(Method::POST, "/devices/sim0/stop", &[200]),
        route(Method::POST, "/devices/sim0/reset", &[200]),
        route(Method::POST, "/devices/sim0/start", &[200]),
        route(Method::POST, "/stop", &[200]),
        route(Method::POST, "/reset", &[200]),
        route(Method::POST, "/start", &[200]),
    ]
}

/// `Authorization` values that must not pass.
fn wrong_credentials() -> Vec<Vec<u8>> {
    vec![
        b"Bearer wrong-token".to_vec(),
        format!("Bearer {TOKEN}x").into_bytes(),
        format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]).into_bytes(),
        format!("Bearer {}", TOKEN.to_uppercase()).into_bytes(),
        format!("Basic {TOKEN}").into_bytes(),
        TOKEN.as_bytes().to_vec(),
        format!("Bearer{TOKEN}").into_bytes(),
        b"Bearer ".to_vec(),
        b"".to_vec(),
        [b"Bearer ".as_slice(), &[0xff; 22]].concat(),
    ]
}

/// Sends `route` with an optional raw `Authorization` value.
async fn send(app: &TestApp, route: &Route, auth: Option<&[u8]>) -> reqwest::Response {
    let mut request = app
        .client
        .request(route.method.clone(), app.url(route.path));
    if let Some(auth) = auth {
        let value = reqwest::header::HeaderValue::from_bytes(auth)
            .expect("test credentials are valid header bytes");
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    if let Some(body) = &route.body {
        request = request.json(body);
    }
    request
        .send()
        .await
        .unwrap_or_else(|err| panic!("{} {} failed: {err}", route.method, route.path))
}

/// Asserts a 401 with a JSON error, a Bearer challenge and no trace of the token.
async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    let challenge = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (code, body) = json_of(response).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    assert!(
        !body["error"].as_str().unwrap_or_default().is_empty(),
        "{what}: {body}"
    );
    assert!(!body.to_string().contains(TOKEN), "{what} leaks the token");
}

/// Asserts an authorised request got one of the route's success statuses.
async fn assert_allowed(response: reqwest::Response, route: &Route, what: &str) {
    let code = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    assert!(route.ok.contains(&code), "{what}: {code} {text}");
}

fn is_probe(route: &Route) -> bool {
    matches!(route.path, "/healthz" | "/readyz")
}

/// Runs the whole matrix against an app configured with [`TOKEN`].
async fn run_matrix(app: &TestApp, protect_reads: bool) {
    let right = format!("Bearer {TOKEN}");
    let status_route = route(Method::GET, "/status", &[200]);
    wait_until(DEADLINE, "samples to flow", async || {
        let (_, status) = json_of(send(app, &status_route, Some(right.as_bytes())).await).await;
        u64_at(&status, "/metrics/samples_processed") > 0
    })
    .await;
    let routes = every_route();
    let needs_token =
        |route: &Route| route.method == Method::POST || (protect_reads && !is_probe(route));
    // Refused attempts first, on every route: none of them may change anything.
    for route in &routes {
        let mut attempts: Vec<Option<Vec<u8>>> = vec![None];
        attempts.extend(wrong_credentials().into_iter().map(Some));
        for auth in attempts {
            let what = format!(
                "{} {} with {:?}",
                route.method,
                route.path,
                auth.as_deref().map(String::from_utf8_lossy)
            );
            let response = send(app, route, auth.as_deref()).await;
            if needs_token(route) {
                assert_unauthorized(response, &what).await;
            } else {
                assert_allowed(response, route, &what).await;
            }
        }
    }
    // The refused POSTs neither stopped the device nor ingested anything.
    let (_, status) = json_of(send(app, &status_route, Some(right.as_bytes())).await).await;
    assert_eq!(status["state"], "Measuring", "{status}");
    let samples_route = route(Method::GET, "/samples?limit=1000", &[200]);
    let (_, samples) = json_of(send(app, &samples_route, Some(right.as_bytes())).await).await;
    let ingested = samples["samples"]
        .as_array()
        .expect("samples is an array")
        .iter()
        .filter(|s| s["unit"] == "V")
        .count();
    assert_eq!(
        ingested, 0,
        "a refused POST /samples was ingested: {samples}"
    );

    // The right token opens every route.
    for route in &routes {
        let what = format!("{} {} with the right token", route.method, route.path);
        let response = send(app, route, Some(right.as_bytes())).await;
        assert_allowed(response, route, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_post_needs_it_and_reads_stay_open() {
    let app = spawn_app(|s| {
        s.http.api_token = Some(telemetryhub::config::Secret::new(TOKEN));
    })
    .await;
    run_matrix(&app, false).await;
    let summary = app.shut_down().await;
    assert_eq!(
        summary.ledger.ingested, 1,
        "only the authorised POST: {summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_protect_reads_every_route_but_the_probes_needs_the_token() {
    let app = spawn_app(|s| {
        s.http.api_token = Some(telemetryhub::config::Secret::new(TOKEN));
        s.http.protect_reads = true;
    })
    .await;
    run_matrix(&app, true).await;
    // HEAD is a read too.
    let response = app.client.head(app.url("/status")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let summary = app.shut_down().await;
    assert_eq!(
        summary.ledger.ingested, 1,
        "only the authorised POST: {summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_every_route_is_open_and_credentials_are_ignored() {
    let app = spawn_app(|_| {}).await;
    app.wait_processed_above(0).await;
    for route in every_route() {
        for auth in [None, Some(b"Bearer anything".as_slice())] {
            let what = format!("{} {} with {auth:?}", route.method, route.path);
            let response = send(&app, &route, auth).await;
            assert_allowed(response, &route, &what).await;
        }
    }
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_upload_is_refused_before_its_body_is_read() {
    // A client announcing a huge body without a token gets its 401 at once: the guard runs
    // before the body limit and the body is never waited for.
    let app = spawn_app(|s| {
        s.http.api_token = Some(telemetryhub::config::Secret::new(TOKEN));
        s.http.request_timeout_ms = 5_000;
    })
    .await;
    let request = b"POST /samples HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                    Content-Length: 100000000\r\n\r\n[";
    let started = std::time::Instant::now();
    let reply =
        crate::helpers::raw_exchange(app.addr, request, std::time::Duration::from_secs(3)).await;
    assert_eq!(reply.status, Some(401), "{reply:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{reply:?}"
    );
    assert!(reply.json().is_some(), "{reply:?}");
    app.status().await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_web_page_cannot_stop_the_gateway_through_a_browser() {
    // Without a token, any page a local user opens could otherwise `fetch(..., {method:
    // "POST", mode: "no-cors"})` the loopback API: a simple request, sent without a preflight.
    let app = spawn_app(|_| {}).await;
    app.wait_processed_above(0).await;
    let own_origin = format!("http://{}", app.addr);
    for (origin, fetch_site) in [
        ("https://evil.example", "cross-site"),
        ("http://127.0.0.1:1", "same-site"),
    ] {
        let response = app
            .client
            .post(app.url("/stop"))
            .header("Origin", origin)
            .header("Sec-Fetch-Site", fetch_site)
            .send()
            .await
            .unwrap();
        let (code, body) = json_of(response).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{origin}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("another origin"),
            "{body}"
        );
        let status = app.status().await;
        assert_eq!(status["state"], "Measuring", "{origin} changed nothing");
    }
    // The gateway's own page (the live page's buttons) and plain clients still may.
    let response = app
        .client
        .post(app.url("/stop"))
        .header("Origin", &own_origin)
        .header("Sec-Fetch-Site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = app.client.post(app.url("/start")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.shut_down().await;
}

/// Config for the binary: one fast device; the token comes from the environment.
const BINARY_CONFIG: &str = "
[pipeline]
shutdown_grace_ms = 2000

[[devices]]
id = \"sim0\"
sample_interval_ms = 10
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_from_the_environment_works_and_never_appears_in_logs() {
    let wrong = "Bearer not-the-token-9f8e7d";
    let mut binary = Binary::start(
        BINARY_CONFIG,
        &[
            ("TELEMETRYHUB__HTTP__API_TOKEN", TOKEN),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let client = crate::helpers::client();
    let post = |auth: Option<&str>, path: &str| {
        let mut request = client.post(binary.url(path)).json(&ingest_body(2.5));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let right = format!("Bearer {TOKEN}");
    let right = right.as_str();
    assert_eq!(post(None, "/samples").await.unwrap().status(), 401);
    assert_eq!(post(Some(wrong), "/samples").await.unwrap().status(), 401);
    assert_eq!(post(Some(wrong), "/stop").await.unwrap().status(), 401);
    assert_eq!(post(Some(right), "/samples").await.unwrap().status(), 202);
    assert_eq!(post(Some(right), "/stop").await.unwrap().status(), 200);
    let status = client.get(binary.url("/status")).send().await.unwrap();
    assert_eq!(status.status(), 200, "reads stay open");

    binary.signal("TERM");
    let (exit, stderr) = binary.wait_exit(std::time::Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}\n{stderr}");
    assert!(stderr.contains("Shutdown complete."), "{stderr}");
    assert!(
        !stderr.contains(TOKEN),
        "the token is in the log:\n{stderr}"
    );
    assert!(!stderr.contains("not-the-token"), "a guess is in the log");
    let stats = binary.read_stats();
    assert!(!stats.to_string().contains(TOKEN));
    assert_stats_balanced(&stats);
    assert_eq!(stats["ingested"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_protect_reads_the_live_page_loads_and_its_event_stream_needs_the_token() {
    let app = spawn_app(|s| {
        s.http.api_token = Some(telemetryhub::config::Secret::new(TOKEN));
        s.http.protect_reads = true;
    })
    .await;
    // The page is static (no telemetry in it), so it loads without the token, also when the
    // token is passed the way the README says; the page never echoes it.
    for path in ["/".to_owned(), format!("/?token={TOKEN}")] {
        let response = app.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
        assert!(content_type.to_str().unwrap().starts_with("text/html"));
        let page = response.text().await.unwrap();
        assert!(page.contains("TelemetryHub"), "GET {path}");
        assert!(!page.contains(TOKEN), "GET {path} echoes the token");
    }
    let head = app.client.head(app.url("/")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);

    // Its data is telemetry: the event stream needs the bearer token like every other read,
    // and a token in the URL (which logs and browser history keep) is not accepted.
    let events = |auth: Option<String>, query: &str| {
        let mut request = app.client.get(app.url(&format!("/events{query}")));
        if let Some(auth) = auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        request.send()
    };
    assert_unauthorized(events(None, "").await.unwrap(), "GET /events").await;
    let in_url = events(None, &format!("?token={TOKEN}")).await.unwrap();
    assert_unauthorized(in_url, "GET /events?token=").await;
    let wrong = events(Some("Bearer wrong".to_owned()), "").await.unwrap();
    assert_unauthorized(wrong, "GET /events with a wrong token").await;

    let mut stream = events(Some(format!("Bearer {TOKEN}")), "").await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let content_type = stream.headers()[reqwest::header::CONTENT_TYPE].clone();
    assert_eq!(content_type, "text/event-stream");
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("\n\n") {
        let chunk = tokio::time::timeout(DEADLINE, stream.chunk())
            .await
            .expect("a snapshot comes at once")
            .expect("the stream is readable")
            .expect("the stream is open");
        received.extend_from_slice(&chunk);
    }
    let first = String::from_utf8_lossy(&received);
    assert!(first.contains("event: snapshot"), "{first}");
    drop(stream);
    app.shut_down().await;
}
