//! One error type for the library. Each variant is a category the gRPC layer maps
//! to a status code; the message is meant for a person and says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something malformed: a bad image, tensor, alpha or file.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the current state forbids it.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The server cannot take the request now (draining, or etcd unreachable); retry.
    #[error("{0}")]
    Unavailable(String),
    /// Another writer changed the same state first; re-read and retry.
    #[error("{0}")]
    Aborted(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client's value quoted for an error message, cut to its first 64 characters: an
/// echo must not grow with the input (gRPC's metadata, which carries the message,
/// holds 16 KB, and logs should not either).
pub fn clip(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        Some((at, _)) => format!("{:?}…", &s[..at]),
        None => format!("{s:?}"),
    }
}

impl Error {
    /// The category as a short label (the gRPC status it maps to), for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Unavailable(_) => "unavailable",
            Error::Aborted(_) => "aborted",
            Error::Io { .. } | Error::Candle(_) | Error::Internal(_) => "internal",
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `bail!(InvalidArgument, "...", args)`: return early with a categorized error.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::$kind(format!($($arg)*)))
    };
}
