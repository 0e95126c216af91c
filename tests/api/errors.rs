//! Every error the API returns is a non-empty JSON body `{"error": "..."}` with
//! `Content-Type: application/json`: unknown routes, wrong methods, bad queries.

use reqwest::{Method, StatusCode};

use crate::helpers::{TestApp, json_of, spawn_app};

/// Sends `method path` and asserts a JSON error with status `expected`.
async fn assert_json_error(app: &TestApp, method: Method, path: &str, expected: StatusCode) {
    let response = app
        .client
        .request(method.clone(), app.url(path))
        .send()
        .await
        .unwrap_or_else(|err| panic!("{method} {path} failed: {err}"));
    // `json_of` checks the content type and that the body parses.
    let (code, body) = json_of(response).await;
    assert_eq!(code, expected, "{method} {path}: {body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        !error.is_empty(),
        "{method} {path}: no error message: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_json_404s() {
    let app = spawn_app(|_| {}).await;
    for (method, path) in [
        (Method::GET, "/nope"),
        (Method::POST, "/nope"),
        (Method::GET, "/devices/sim0/extra/segments"),
        (Method::GET, "/status/"),
        (Method::DELETE, "/nothing/here"),
    ] {
        assert_json_error(&app, method, path, StatusCode::NOT_FOUND).await;
    }
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_are_json_405s() {
    let app = spawn_app(|_| {}).await;
    for (method, path) in [
        (Method::GET, "/start"),
        (Method::GET, "/stop"),
        (Method::GET, "/reset"),
        (Method::POST, "/status"),
        (Method::POST, "/metrics"),
        (Method::PUT, "/samples"),
        (Method::DELETE, "/devices"),
        (Method::PUT, "/devices/sim0"),
        (Method::GET, "/devices/sim0/start"),
        (Method::POST, "/healthz"),
        (Method::DELETE, "/"),
        (Method::POST, "/events"),
    ] {
        assert_json_error(&app, method, path, StatusCode::METHOD_NOT_ALLOWED).await;
    }
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sample_queries_are_json_400s() {
    let app = spawn_app(|s| s.pipeline.history = 1000).await;
    for query in [
        "limit=abc",
        "limit=0",
        "limit=-1",
        "limit=999999",
        "limit=1001",
        "limit=1.5",
        "limit=",
        "limit=99999999999999999999999",
        "other=1",
    ] {
        let path = format!("/samples?{query}");
        assert_json_error(&app, Method::GET, &path, StatusCode::BAD_REQUEST).await;
    }
    for query in ["limit=1", "limit=1000", ""] {
        let (code, body) = app.get_json(&format!("/samples?{query}")).await;
        assert_eq!(code, StatusCode::OK, "{query}: {body}");
    }
    app.shut_down().await;
}
