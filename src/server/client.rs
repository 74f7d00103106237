//! The client side of rws.v1: every call the `rws` commands and `rws bench` make, in
//! one place, so that nothing outside [`crate::server`] builds a request. Replies are
//! the wire's types; refusals become [`Error`]s of the matching kind, carrying the
//! server's message.

use std::time::Duration;

use tonic::codegen::http::Uri;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use super::{MAX_ADMIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES, pb};
use crate::serve::activation::End;
use crate::serve::profile::SignatureRef;
use crate::{Error, Result};

/// Adds `authorization: Bearer <token>` to each call: the client's side of [`super::auth`].
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type AdminClient = pb::admin_client::AdminClient<InterceptedService<Channel, Bearer>>;
pub type EventsClient = pb::events_client::EventsClient<InterceptedService<Channel, Bearer>>;

/// An Admin client that presents `token`, if any.
pub fn admin_client(channel: Channel, token: Option<&str>) -> crate::Result<AdminClient> {
    Ok(pb::admin_client::AdminClient::with_interceptor(
        channel,
        bearer(token)?,
    ))
}

/// An Events client that presents `token`, as Events calls need it like Admin's.
pub fn events_client(channel: Channel, token: Option<&str>) -> crate::Result<EventsClient> {
    Ok(pb::events_client::EventsClient::with_interceptor(
        channel,
        bearer(token)?,
    ))
}

fn bearer(token: Option<&str>) -> crate::Result<Bearer> {
    let header = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| Error::InvalidArgument("the admin token must be printable ASCII".into()))?;
    Ok(Bearer(header))
}

type InferenceClient = pb::inference_client::InferenceClient<Channel>;

/// The address of a server as a URI. `serve --addr` prints `host:port`, so a bare
/// `host:port` means `http://host:port`.
pub fn server_uri(addr: &str) -> Result<Uri> {
    let bad = || {
        Error::InvalidArgument(format!(
            "{} is not a server address like 127.0.0.1:50051 or https://host:50051",
            crate::error::clip(addr)
        ))
    };
    let full = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let uri: Uri = full.parse().map_err(|_| bad())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(uri),
        _ => Err(bad()),
    }
}

/// A connected client: inference and admin calls over one channel.
#[derive(Clone)]
pub struct RwsClient {
    inference: InferenceClient,
    admin: AdminClient,
    events: EventsClient,
}

/// Maps a refusal to the library's error of the same kind, keeping its message.
fn refused(s: tonic::Status) -> Error {
    use tonic::Code;
    let m = s.message().to_string();
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(m),
        Code::NotFound => Error::NotFound(m),
        Code::AlreadyExists => Error::AlreadyExists(m),
        Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated => {
            Error::FailedPrecondition(format!("{m} ({})", s.code().description()))
        }
        Code::ResourceExhausted => Error::ResourceExhausted(m),
        Code::DeadlineExceeded => Error::DeadlineExceeded(m),
        Code::Unavailable => Error::Unavailable(m),
        Code::Aborted => Error::Aborted(m),
        c => Error::Internal(format!("{m} ({})", c.description())),
    }
}

impl RwsClient {
    /// Connects to `addr` (see [`server_uri`]); `tls_ca` is the PEM of the authority
    /// that signed an https server's certificate, `admin_token` what Admin calls
    /// present.
    pub async fn connect(
        addr: &str,
        tls_ca: Option<&[u8]>,
        admin_token: Option<&str>,
    ) -> Result<RwsClient> {
        let mut endpoint = Endpoint::from(server_uri(addr)?);
        if let Some(pem) = tls_ca {
            super::use_ring_for_tls();
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| Error::InvalidArgument(format!("TLS setup failed: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach an rws server at {addr} ({e}); is `rws serve` running there?"
            ))
        })?;
        Self::on(channel, admin_token)
    }

    fn on(channel: Channel, admin_token: Option<&str>) -> Result<RwsClient> {
        Ok(RwsClient {
            inference: InferenceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            admin: admin_client(channel.clone(), admin_token)?
                .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES),
            events: events_client(channel, admin_token)?,
        })
    }

    /// Classifies an encoded image from `source` (may be empty) with `profile`
    /// (empty: the activation covering the source, else the server default).
    pub async fn classify(
        &mut self,
        image: Vec<u8>,
        profile: &str,
        source: &str,
        top_k: u32,
        with_logits: bool,
    ) -> Result<pb::ClassifyResponse> {
        let req = pb::ClassifyRequest {
            input: Some(pb::classify_request::Input::Image(image)),
            profile: profile.into(),
            top_k,
            return_logits: with_logits,
            source: source.into(),
        };
        Ok(self
            .inference
            .classify(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn put_profile(
        &mut self,
        name: &str,
        signatures: &[SignatureRef],
        replace: bool,
        wait_fleet: bool,
    ) -> Result<pb::ProfileChange> {
        let req = pb::PutProfileRequest {
            name: name.into(),
            signatures: signatures
                .iter()
                .map(|s| pb::SignatureRef {
                    name: s.name.clone(),
                    alpha: s.alpha,
                })
                .collect(),
            replace,
            wait_fleet,
        };
        Ok(self
            .admin
            .put_profile(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn delete_profile(
        &mut self,
        name: &str,
        wait_fleet: bool,
    ) -> Result<pb::ProfileChange> {
        let req = pb::DeleteProfileRequest {
            name: name.into(),
            wait_fleet,
        };
        Ok(self
            .admin
            .delete_profile(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn set_default(&mut self, name: &str, wait_fleet: bool) -> Result<pb::ProfileChange> {
        let req = pb::SetDefaultProfileRequest {
            name: name.into(),
            wait_fleet,
        };
        Ok(self
            .admin
            .set_default_profile(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn list_profiles(&mut self) -> Result<pb::ListProfilesResponse> {
        Ok(self
            .admin
            .list_profiles(pb::ListProfilesRequest {})
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn list_signatures(&mut self) -> Result<pb::ListSignaturesResponse> {
        Ok(self
            .admin
            .list_signatures(pb::ListSignaturesRequest {})
            .await
            .map_err(refused)?
            .into_inner())
    }

    /// Loads a signature: by its path inside the model directory, or (`upload`) by
    /// sending the bytes.
    pub async fn load_signature(
        &mut self,
        name: &str,
        source: SignatureUpload,
        allow_transfer: bool,
        wait_fleet: bool,
    ) -> Result<pb::LoadSignatureResponse> {
        use pb::load_signature_request::Source;
        let req = pb::LoadSignatureRequest {
            name: name.into(),
            source: Some(match source {
                SignatureUpload::Path(p) => Source::Path(p),
                SignatureUpload::Bytes(b) => Source::Data(b),
            }),
            allow_transfer,
            wait_fleet,
        };
        Ok(self
            .admin
            .load_signature(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn unload_signature(&mut self, name: &str, wait_fleet: bool) -> Result<()> {
        let req = pb::UnloadSignatureRequest {
            name: name.into(),
            wait_fleet,
        };
        self.admin.unload_signature(req).await.map_err(refused)?;
        Ok(())
    }

    /// Switches `profile` on for `scope` until `end`.
    pub async fn activate(
        &mut self,
        scope: &str,
        profile: &str,
        end: End,
        reason: &str,
        wait_fleet: bool,
    ) -> Result<pb::ActivationInfo> {
        let (ttl_seconds, until_unix_ms) = match end {
            End::After(d) => (d.as_secs_f64(), 0),
            End::At(t) => (0.0, t),
        };
        let req = pb::ActivateRequest {
            scope: scope.into(),
            profile: profile.into(),
            ttl_seconds,
            until_unix_ms,
            reason: reason.into(),
            wait_fleet,
        };
        Ok(self
            .admin
            .activate(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn deactivate(&mut self, id: &str, wait_fleet: bool) -> Result<()> {
        let req = pb::DeactivateRequest {
            id: id.into(),
            wait_fleet,
        };
        self.admin.deactivate(req).await.map_err(refused)?;
        Ok(())
    }

    pub async fn history(&mut self, scope: &str, limit: u32) -> Result<pb::HistoryResponse> {
        let req = pb::HistoryRequest {
            scope: scope.into(),
            limit,
        };
        Ok(self.admin.history(req).await.map_err(refused)?.into_inner())
    }

    /// Reports a weather or sensor event; the server's rules decide what it changes.
    pub async fn report(&mut self, event: pb::EventReport) -> Result<pb::EventOutcome> {
        Ok(self
            .events
            .report(event)
            .await
            .map_err(refused)?
            .into_inner())
    }

    /// Starts (or with `fraction` 0 stops) the shadow of `profile`.
    pub async fn shadow(&mut self, profile: &str, fraction: f64) -> Result<pb::ShadowInfo> {
        let req = pb::ShadowRequest {
            profile: profile.into(),
            fraction,
        };
        Ok(self.admin.shadow(req).await.map_err(refused)?.into_inner())
    }

    pub async fn list_shadows(&mut self) -> Result<pb::ListShadowsResponse> {
        let req = pb::ListShadowsRequest {};
        Ok(self
            .admin
            .list_shadows(req)
            .await
            .map_err(refused)?
            .into_inner())
    }

    pub async fn list_activations(&mut self) -> Result<pb::ListActivationsResponse> {
        let req = pb::ListActivationsRequest {};
        Ok(self
            .admin
            .list_activations(req)
            .await
            .map_err(refused)?
            .into_inner())
    }
}

/// Where [`RwsClient::load_signature`] takes a signature from.
pub enum SignatureUpload {
    /// Relative to the server's model directory.
    Path(String),
    Bytes(Vec<u8>),
}

/// How long the server took to apply a change, as it reported.
pub fn applied_in(c: &pb::ProfileChange) -> Duration {
    Duration::from_secs_f64(c.apply_micros.max(0.0) / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_means_http_and_malformed_addresses_say_so() {
        assert_eq!(
            server_uri("127.0.0.1:50051").unwrap().to_string(),
            "http://127.0.0.1:50051/"
        );
        assert_eq!(
            server_uri("https://rws.example:443").unwrap().scheme_str(),
            Some("https")
        );
        assert_eq!(server_uri("localhost:9").unwrap().host(), Some("localhost"));
        for bad in ["", "ftp://x:1", "http://", "not an address", "http://[::1"] {
            let err = server_uri(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("127.0.0.1:50051"), "{err}");
        }
    }
}
