//! What the JSON-over-HTTP endpoints (events, console) share: errors as
//! `{"error": message}` with the HTTP status matching the gRPC one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::Error;

/// `{"error": message}` with `code`.
pub fn json_error(code: StatusCode, message: &str) -> Response {
    (code, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// An engine refusal: the status gRPC would use, mapped to HTTP.
pub fn refused(e: Error) -> Response {
    let code = match &e {
        Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::AlreadyExists(_) | Error::Aborted(_) => StatusCode::CONFLICT,
        Error::FailedPrecondition(_) => StatusCode::PRECONDITION_FAILED,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Io { .. } | Error::Candle(_) | Error::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    json_error(code, &e.to_string())
}

/// Serves `router` on `listener`, with each handler able to see its peer's
/// address (loopback checks), until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    what: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(|e| Error::Internal(format!("{what}: {e}")))
}
