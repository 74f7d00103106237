//! What the JSON-over-HTTP endpoints (events, console) share: refusals as
//! `{"error": message}` with the HTTP status matching the gRPC one, and serving.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::Error;

/// A request refused: its status and a message for the client.
#[derive(Debug)]
pub struct Refusal {
    code: StatusCode,
    message: String,
}

impl Refusal {
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// An engine refusal: the status gRPC would use, mapped to HTTP.
impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
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
        Refusal::new(code, e.to_string())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({ "error": self.message }));
        (self.code, body).into_response()
    }
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
