//! `/metrics` on the wire: the Prometheus text format of the recorder that
//! [`crate::serve::metrics`] installs.

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::http::Side;
use crate::Result;
use crate::serve::metrics::collect_process;

/// Serves the recorder at `/metrics` until the shutdown closes.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, side: Side) -> Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            collect_process();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    crate::serve::metrics::render(&handle),
                )
            }
        }),
    );
    super::http::serve(listener, app, "metrics server", &side).await
}
