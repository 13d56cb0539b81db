//! The target's HTTP endpoint (`--metrics HOST:PORT`): `GET /metrics`,
//! and the scrape it serves (also the control socket's `metrics` op).

use std::sync::Arc;

use crate::metrics;
use crate::session::Shared;

/// A scrape of the running target (reads the catalog: call it off the
/// async threads).
pub(crate) fn scrape(shared: &Shared) -> crate::Result<String> {
    let disks = crate::catalog::disk_states(&shared.cfg.data_dir)?;
    let set =
        |m: &std::sync::Mutex<std::collections::HashSet<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(metrics::render(
        &disks,
        &metrics::Live {
            uptime: shared.started.elapsed(),
            connected: set(&shared.live),
            failed_over: set(&shared.failed_over),
            stats: &shared.stats,
        },
    ))
}

/// Serve `GET /metrics` on `listener` until `stop`.
pub(crate) async fn serve_http(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let shared = shared.clone();
            async move {
                let scraped = tokio::task::spawn_blocking(move || scrape(&shared))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match scraped {
                    Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")).into_response(),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::warn!("metrics endpoint failed: {e}");
    }
}
