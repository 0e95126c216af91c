//! The OpenAPI contract, checked by tools this project did not write, against the real binary
//! on loopback: `openapi-spec-validator` validates `GET /openapi.json`, then Schemathesis
//! (property-based, every check it has) fuzzes every route with the token and without it, in
//! a bounded time. Both are installed by `scripts/test.sh`; a missing one fails the test.
//!
//! The state-changing routes are fuzzed too. That cannot make the run flaky: whatever order
//! Schemathesis stops, starts, resets or commands the device in, and however full the buffer,
//! every answer (409 for a refused transition, 503 from `/readyz` with the device stopped, 429
//! from ingest) is one the document names for that route. Afterwards the gateway must still
//! answer and its shutdown accounting must balance.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{Binary, DEADLINE, assert_stats_balanced, client, temp_path};

const TOKEN: &str = "schemathesis-token-5b1d";

/// Seconds of fuzzing per Schemathesis run (two runs).
const FUZZ_SECONDS: &str = "12";

/// The most one tool run may take, startup included, before the test fails.
const TOOL_LIMIT: Duration = Duration::from_secs(90);

/// Runs `program args` in a scratch directory (Schemathesis writes a cache where it runs),
/// failing the test if it is missing, fails or overruns; returns its output.
async fn run_tool(program: &str, args: &[&str]) -> String {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Keep the tool off any proxy: it talks to 127.0.0.1 only.
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot run `{program}` ({err}); scripts/test.sh installs it with pip")
        });
    let output = tokio::time::timeout(TOOL_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{program}` ran longer than {TOOL_LIMIT:?}"))
        .expect("the tool's output is readable");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        // Schemathesis prints each failure with a curl line to reproduce it; the summary is
        // at the end.
        let tail = &text[text.len().saturating_sub(20_000)..];
        panic!(
            "`{program} {}` failed ({}):\n{tail}",
            args.join(" "),
            output.status
        );
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_validates_and_schemathesis_finds_nothing_with_or_without_the_token() {
    let config = format!("[http]\napi_token = \"{TOKEN}\"\nprotect_reads = true\n");
    let mut gateway = Binary::start(&config, &[]).await;
    let http = client();
    let url = gateway.url("/openapi.json");
    // A read like the others: with `protect_reads`, the document needs the token too.
    let refused = http.get(&url).send().await.expect("GET /openapi.json");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let document = http
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /openapi.json")
        .text()
        .await
        .expect("the document");
    let file = temp_path("openapi.json");
    std::fs::write(&file, &document).expect("the temp dir is writable");
    let file = file.to_str().expect("a UTF-8 temp path").to_owned();

    let validated = run_tool("openapi-spec-validator", &[&file]).await;
    assert!(validated.contains("OK"), "{validated}");

    let base = format!("http://{}", gateway.addr);
    let settings = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api/schemathesis.toml");
    let authorization = format!("Authorization: Bearer {TOKEN}");
    for token in [Some(authorization.as_str()), None] {
        let mut args = vec![
            "--config-file",
            settings.to_str().expect("a UTF-8 path"),
            "run",
            &file,
            "--url",
            &base,
            "--checks",
            "all",
            // `/events` is an endless stream by design (it ends only at shutdown), so no
            // response of it ever completes for Schemathesis to check; the stream is
            // checked in http_layers.rs and live.rs.
            "--exclude-path",
            "/events",
            "--max-examples",
            "10",
            "--max-time",
            FUZZ_SECONDS,
            "--request-timeout",
            "10",
            "--workers",
            "1",
            "--no-color",
        ];
        if let Some(header) = token {
            args.extend(["--header", header]);
        }
        let report = run_tool("schemathesis", &args).await;
        assert!(
            report.contains("Tested: 19"),
            "not every route was tested:\n{report}"
        );
    }

    // The gateway is still serving, and nothing the fuzzing did broke the ledger.
    let health = http.get(gateway.url("/healthz")).send().await;
    assert!(health.is_ok_and(|r| r.status() == StatusCode::OK));
    let _ = std::fs::remove_file(&file);
    gateway.signal("TERM");
    let (exit, stderr) = gateway.wait_exit(DEADLINE).await;
    assert!(exit.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_stats_balanced(&gateway.read_stats());
}

#[tokio::test]
async fn every_operation_asks_for_the_token_exactly_where_the_document_says() {
    let app = crate::helpers::spawn_app(|s| {
        s.http.api_token = Some(telemetryhub::config::Secret::new(TOKEN));
        s.http.protect_reads = true;
    })
    .await;
    let (code, document) = crate::helpers::json_of(
        app.client
            .get(app.url("/openapi.json"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET /openapi.json"),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{document}");
    let paths = document["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        let url = app.url(&path.replace("{id}", "sim0"));
        for (method, operation) in item.as_object().expect("operations") {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                .expect("an HTTP method");
            let needs_token = operation.get("security").is_some();
            // Without the token: refused exactly where the document says (before any effect).
            let response = app
                .client
                .request(method.clone(), &url)
                .send()
                .await
                .expect("the request is answered");
            let refused = response.status() == StatusCode::UNAUTHORIZED;
            assert_eq!(
                refused,
                needs_token,
                "{method} {path}: {}",
                response.status()
            );
            checked += 1;
        }
        // A method no route has is a 405, with or without the token, never a 401.
        let response = app
            .client
            .request(reqwest::Method::TRACE, &url)
            .send()
            .await
            .expect("the request is answered");
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "TRACE {path}"
        );
    }
    assert_eq!(checked, 20, "every operation of every route");
    app.shut_down().await;
}
