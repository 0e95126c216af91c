//! The live page: `GET /` serves a small dashboard (device states with start / stop / reset
//! buttons, live charts of values and buffer depth, counters, and with an uplink its broker
//! connection and spool backlog), and `GET /events` feeds it a server-sent-events stream of
//! snapshots.
//!
//! The page's HTML, stylesheet and script live under `assets/live/` and are compiled into the
//! binary, inlined into one response, so the page needs no other route, no file on disk and
//! nothing from a CDN. Each snapshot carries what `GET /status` shows (its `uplink` object only
//! when an uplink is configured: the page shows the uplink exactly then) plus the processed
//! samples that arrived since the previous snapshot; the stream ends when the gateway starts
//! shutting down, so it never holds the HTTP server's drain open.
//!
//! With `http.protect_reads`, the page itself still loads without the token (it is the same
//! static file for everyone; a browser cannot send a bearer token when it opens a page), and the
//! page sends the token the user gives it (`#token=...` in the address, or a prompt) as an
//! `Authorization` header on `/events` and on the controls. That is why it reads the stream with
//! `fetch` rather than `EventSource`, which cannot send headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde_json::json;
use tokio::time::{Interval, MissedTickBehavior};

use super::AppState;

/// The whole page: markup, then its stylesheet and script inlined.
const PAGE: &str = concat!(
    include_str!("../../assets/live/index.html"),
    "<style>\n",
    include_str!("../../assets/live/live.css"),
    "</style>\n<script>\n",
    include_str!("../../assets/live/live.js"),
    "</script>\n</body>\n</html>\n",
);

/// Everything the page may load: only itself and the API (no CDN, no third-party origin).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Time between two snapshots on `/events`: fast enough for a live chart, slow enough that
/// an open page costs the gateway next to nothing.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(500);

/// Most samples one snapshot carries (the page's chart needs no more; the first snapshot
/// back-fills with up to this many).
pub const MAX_SAMPLES_PER_EVENT: usize = 250;

/// How long a browser waits before reconnecting after the stream ends (e.g. on a restart).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

/// `GET /`: the live page.
#[utoipa::path(get, path = "/", tag = "live", responses(
    (status = 200, description = "The live page: one static HTML document", content_type = "text/html", body = String),
))]
pub(super) async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /events`: a `snapshot` event every [`EVENT_INTERVAL`] until shutdown begins.
#[utoipa::path(get, path = "/events", tag = "live", responses(
    (status = 200, description = "Server-sent events: a `snapshot` every 500 ms, its data a \
        JSON object with `status` (as `GET /status`) and `samples` (those not sent before); \
        never ends before shutdown", content_type = "text/event-stream", body = String),
))]
pub(super) async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(snapshots(state))
}

/// The snapshot stream behind `/events`, ending when the gateway begins shutting down.
fn snapshots(state: Arc<AppState>) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut tick = tokio::time::interval(EVENT_INTERVAL);
    // A slow client gets fewer snapshots, never a burst of stale ones.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let cursor = Cursor {
        state,
        tick,
        started: false,
        last_order: None,
    };
    futures_util::stream::unfold(cursor, |mut cursor| async move {
        let event = cursor.next().await?;
        Some((Ok(event), cursor))
    })
}

/// Where one `/events` client is: its timer, whether it has had a snapshot, and the newest
/// sample it has been sent.
struct Cursor {
    state: Arc<AppState>,
    tick: Interval,
    started: bool,
    last_order: Option<u64>,
}

impl Cursor {
    /// Waits for the next tick and builds its event; `None` once shutdown has begun.
    async fn next(&mut self) -> Option<Event> {
        tokio::select! {
            biased;
            _ = self.state.shutdown.cancelled() => return None,
            _ = self.tick.tick() => {}
        }
        let event = Event::default()
            .event("snapshot")
            .data(self.snapshot().await.to_string());
        if self.started {
            Some(event)
        } else {
            self.started = true;
            Some(event.retry(RECONNECT_AFTER))
        }
    }

    /// What `GET /status` shows, plus the processed samples this client has not seen yet.
    async fn snapshot(&mut self) -> serde_json::Value {
        let mut samples = self.state.worker.recent(MAX_SAMPLES_PER_EVENT);
        if let Some(last) = self.last_order {
            samples.retain(|s| s.order > last);
        }
        if let Some(newest) = samples.last() {
            self.last_order = Some(newest.order);
        }
        let status = super::status::status_body(&self.state);
        json!({ "status": status, "samples": samples })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use futures_util::StreamExt;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::config::{Settings, UplinkSettings};
    use crate::pipeline::Pipeline;

    fn settings() -> Settings {
        let mut settings = Settings::default();
        settings.devices[0].sample_interval_ms = 10;
        settings
    }

    /// A gateway without an uplink.
    fn state(tracker: &TaskTracker, cancel: &CancellationToken) -> AppState {
        let settings = settings();
        let pipeline = Pipeline::start(&settings, tracker, cancel, None, None);
        app_state(&settings, &pipeline, cancel)
    }

    fn app_state(settings: &Settings, pipeline: &Pipeline, cancel: &CancellationToken) -> AppState {
        AppState {
            devices: pipeline.devices.clone(),
            devices_settled: pipeline.devices_settled(),
            buffer: pipeline.buffer.clone(),
            worker: pipeline.worker.clone(),
            pool: pipeline.pool.clone(),
            workers: pipeline.workers,
            prometheus: crate::metrics::install(),
            shutdown: cancel.clone(),
            started: Instant::now(),
            ingest: Arc::new(crate::swap::Swap::new(Arc::new(
                crate::api::IngestLimits::new(settings),
            ))),
            uplink: pipeline.uplink.clone(),
            reload: None,
        }
    }

    fn cursor(state: AppState) -> Cursor {
        Cursor {
            state: Arc::new(state),
            tick: tokio::time::interval(EVENT_INTERVAL),
            started: false,
            last_order: None,
        }
    }

    #[test]
    fn the_page_inlines_its_assets_and_loads_nothing_from_elsewhere() {
        assert!(PAGE.starts_with("<!doctype html>"));
        assert!(PAGE.contains("fetch('events'"));
        assert!(PAGE.trim_end().ends_with("</html>"));
        for external in [
            "http://",
            "https://",
            "//cdn",
            "<script src",
            "<link rel=\"stylesheet\"",
        ] {
            assert!(!PAGE.contains(external), "the page refers to {external}");
        }
    }

    #[test]
    fn the_uplink_section_starts_hidden_and_stays_hidden_until_shown() {
        // Hidden until a snapshot carries an uplink; a `display` rule on the section would
        // override the `hidden` attribute, so the stylesheet must restore it.
        let section = &PAGE[PAGE
            .find("<section id=\"uplink\"")
            .expect("the section exists")..];
        let tag = &section[..section.find('>').expect("the tag ends")];
        assert!(tag.contains(" hidden"), "{tag}");
        assert!(PAGE.contains(".uplink[hidden] { display: none; }"));
        assert!(PAGE.contains("renderUplink(status.uplink)"));
    }

    #[test]
    fn the_page_sends_the_token_on_its_event_stream_and_never_in_a_url() {
        // EventSource cannot send an Authorization header, so with `protect_reads` it could
        // never get past the guard; the page must read the stream with its own headers.
        assert!(
            !PAGE.contains("EventSource("),
            "EventSource cannot send the token"
        );
        let connect = &PAGE[PAGE
            .find("async function connect()")
            .expect("connect() exists")..];
        let connect = &connect[..connect.find("\n  }\n").expect("connect() ends")];
        assert!(connect.contains("...authorization()"), "{connect}");
        let token_in_url = ["?token=${", "token=' +", "&token="];
        for pattern in token_in_url {
            assert!(
                !PAGE.contains(pattern),
                "the page puts the token in a URL: {pattern}"
            );
        }
    }

    fn seqs(snapshot: &serde_json::Value) -> Vec<u64> {
        snapshot["samples"]
            .as_array()
            .expect("samples is an array")
            .iter()
            .map(|s| s["seq"].as_u64().expect("simulated samples have a seq"))
            .collect()
    }

    #[tokio::test]
    async fn snapshots_carry_status_and_only_new_samples() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let mut cursor = cursor(state(&tracker, &cancel));
        let mut seen = Vec::new();
        let mut batches = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while batches < 3 {
            assert!(tokio::time::Instant::now() < deadline, "no samples arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let snapshot = cursor.snapshot().await;
            assert_eq!(snapshot["status"]["devices"][0]["id"], "sim0");
            assert!(snapshot["status"]["metrics"]["queue_capacity"].as_u64() > Some(0));
            // No uplink configured: nothing for the page to show.
            assert!(snapshot["status"].get("uplink").is_none(), "{snapshot}");
            let batch = seqs(&snapshot);
            if let (Some(prev), Some(first)) = (seen.last(), batch.first()) {
                assert!(
                    first > prev,
                    "snapshot repeats sample {first} (last sent {prev})"
                );
            }
            batches += usize::from(!batch.is_empty());
            seen.extend(batch);
        }
        cancel.cancel();
        tracker.close();
    }

    #[tokio::test]
    async fn snapshots_carry_the_uplink_connection_and_backlog() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let spool = tempfile::tempdir().expect("a temp dir");
        // A port nobody listens on: the uplink stays disconnected and the backlog grows.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let broker = format!("mqtt://127.0.0.1:{port}");
        let mut settings = settings();
        settings.spool.path = spool.path().to_owned();
        let uplink = UplinkSettings::new(broker.clone());
        let opened = crate::uplink::open(&uplink, &settings.spool).expect("the spool opens");
        settings.uplink = Some(uplink);
        let pipeline = Pipeline::start(&settings, &tracker, &cancel, None, Some(opened));
        let mut cursor = cursor(app_state(&settings, &pipeline, &cancel));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let uplink = loop {
            let snapshot = cursor.snapshot().await;
            let uplink = snapshot["status"]["uplink"].clone();
            assert_eq!(uplink["broker"], broker.as_str(), "{snapshot}");
            assert_eq!(uplink["connected"], false, "{uplink}");
            if uplink["pending_samples"].as_u64() > Some(0) {
                break uplink;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no backlog: {uplink}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            uplink["oldest_pending_age_seconds"].as_f64() >= Some(0.0),
            "a backlog has an oldest sample: {uplink}"
        );
        assert_eq!(uplink["forwarded"], 0, "{uplink}");

        pipeline
            .drain(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        cancel.cancel();
        tracker.close();
    }

    #[tokio::test]
    async fn the_stream_ends_when_shutdown_begins() {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let mut stream = Box::pin(snapshots(Arc::new(state(&tracker, &cancel))));
        let deadline = Duration::from_secs(10);
        let first = tokio::time::timeout(deadline, stream.next())
            .await
            .expect("the first snapshot comes at once");
        assert!(matches!(first, Some(Ok(_))));
        cancel.cancel();
        let end = tokio::time::timeout(deadline, stream.next())
            .await
            .expect("the stream ends promptly on shutdown");
        assert!(end.is_none(), "no event after shutdown began");
        tracker.close();
    }
}
