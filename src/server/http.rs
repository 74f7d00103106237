//! What the HTTP side endpoints (events, console, metrics) share: refusals as
//! `{"error": message}` with the HTTP status matching the gRPC one, and serving
//! them with the gRPC server's certificate and shutdown phases.

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

impl From<super::auth::Refused> for Refusal {
    fn from(r: super::auth::Refused) -> Self {
        let code = match r {
            super::auth::Refused::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            super::auth::Refused::Denied(_) => StatusCode::FORBIDDEN,
        };
        Refusal::new(code, r.message())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({ "error": self.message }));
        (self.code, body).into_response()
    }
}

/// What every side endpoint takes from the server: who may change things, the
/// certificate (when the server has one), and when to close.
#[derive(Clone)]
pub struct Side {
    pub auth: std::sync::Arc<super::auth::Auth>,
    /// TLS with the gRPC server's certificate; then cookies are `Secure`.
    pub tls: Option<axum_server::tls_rustls::RustlsConfig>,
    pub shutdown: super::shutdown::Shutdown,
    /// How long open connections may finish once the listener closes.
    pub drain_timeout: std::time::Duration,
}

impl Side {
    /// The same certificate and key as the gRPC port, as the side endpoints'
    /// TLS configuration.
    pub async fn tls_config(
        tls: &super::Tls,
    ) -> crate::Result<axum_server::tls_rustls::RustlsConfig> {
        super::use_ring_for_tls();
        axum_server::tls_rustls::RustlsConfig::from_pem(tls.cert.clone(), tls.key.clone())
            .await
            .map_err(|e| Error::InvalidArgument(format!("TLS for the side endpoints: {e}")))
    }
}

/// Serves `router` on `listener` (TLS when `side` has it), with each handler
/// able to see its peer's address, until the shutdown closes; open connections
/// (an event stream, a slow client) get the drain timeout to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    what: &str,
    side: &Side,
) -> crate::Result<()> {
    let handle = axum_server::Handle::new();
    {
        let (handle, closing, timeout) =
            (handle.clone(), side.shutdown.closing(), side.drain_timeout);
        tokio::spawn(async move {
            closing.await;
            handle.graceful_shutdown(Some(timeout));
        });
    }
    let failed = |e: std::io::Error| Error::Internal(format!("{what}: {e}"));
    let listener = listener.into_std().map_err(failed)?;
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match &side.tls {
        Some(tls) => {
            axum_server::from_tcp_rustls(listener, tls.clone())
                .handle(handle)
                .serve(app)
                .await
        }
        None => {
            axum_server::from_tcp(listener)
                .handle(handle)
                .serve(app)
                .await
        }
    }
    .map_err(failed)
}
