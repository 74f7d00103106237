//! Large uploads refused at the door: a gRPC message says its length in the
//! first five bytes of its body, so a large image from a client that already
//! has its share of large decodes is refused from that prefix, before the
//! rest arrives. Without this the transport would receive every byte of a
//! flood only for admission to refuse it.
//!
//! It wraps unary services only (Inference, KServe): waiting for a body's
//! first bytes before the handler runs would stall a stream whose client
//! waits to hear from the server first.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::serve::engine::Engine;

/// Whether an upload of so many bytes from this peer is refused unread.
type Check = Arc<dyn Fn(IpAddr, usize) -> crate::Result<()> + Send + Sync>;

/// Wraps a gRPC service whose uploads may be large images.
#[derive(Clone)]
pub struct EarlyRefusal<S> {
    inner: S,
    check: Check,
}

impl<S> EarlyRefusal<S> {
    /// Refuses what the engine's admission would refuse once the message is read.
    pub fn new(inner: S, engine: Arc<Engine>) -> Self {
        let check = Arc::new(move |ip, bytes| engine.admission().refuse_large_upload(ip, bytes));
        EarlyRefusal { inner, check }
    }
}

impl<S: NamedService> NamedService for EarlyRefusal<S> {
    const NAME: &'static str = S::NAME;
}

type Reply = http::Response<Body>;

impl<S> tower::Service<http::Request<Body>> for EarlyRefusal<S>
where
    S: tower::Service<http::Request<Body>, Response = Reply, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The service made ready is the one that must be called; a fresh clone
        // takes its place for the next request.
        let mut inner = self.inner.clone();
        std::mem::swap(&mut self.inner, &mut inner);
        // Every upload's prefix is read, whoever sends it: a peer not full when
        // its request starts may be full once its prefix arrives (measured:
        // skipping those doubled the good client's p99 under a flood).
        let Some(ip) = peer_ip(&req) else {
            return Box::pin(inner.call(req));
        };
        let check = self.check.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let (head, rest) = match read_prefix(body).await {
                Ok(read) => read,
                Err(status) => return Ok(status.into_http()),
            };
            if let Some(len) = message_len(&head)
                && let Err(e) = check(ip, len)
            {
                return Ok(super::status(e).into_http());
            }
            let body = Body::new(Prepended { head, rest });
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

fn peer_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

/// Reads frames until the body has given five bytes, ended, or sent
/// something other than data; returns those frames and the rest of the body.
async fn read_prefix(mut body: Body) -> Result<(VecDeque<Frame<Bytes>>, Body), tonic::Status> {
    let (mut head, mut seen) = (VecDeque::new(), 0);
    while seen < 5 {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame?;
        let data = frame.data_ref().map(Bytes::len);
        head.push_back(frame);
        match data {
            Some(n) => seen += n,
            None => break,
        }
    }
    Ok((head, body))
}

/// The length the first gRPC message says it has, once five bytes are in.
fn message_len(head: &VecDeque<Frame<Bytes>>) -> Option<usize> {
    let mut prefix = [0u8; 5];
    let mut filled = 0;
    for data in head.iter().filter_map(Frame::data_ref) {
        let take = data.len().min(5 - filled);
        prefix[filled..filled + take].copy_from_slice(&data[..take]);
        filled += take;
        if filled == 5 {
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
            return Some(len as usize);
        }
    }
    None
}

/// A body whose first frames were already read.
struct Prepended {
    head: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Prepended {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(frame) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn frames(parts: &[&[u8]]) -> VecDeque<Frame<Bytes>> {
        parts
            .iter()
            .map(|p| Frame::data(Bytes::copy_from_slice(p)))
            .collect()
    }

    #[test]
    fn the_length_is_read_across_frames_and_only_once_five_bytes_are_in() {
        let len = 11_000_000u32.to_be_bytes();
        assert_eq!(
            message_len(&frames(&[&[0, len[0]], &len[1..]])),
            Some(11_000_000)
        );
        assert_eq!(message_len(&frames(&[&[0, len[0], len[1]]])), None);
        assert_eq!(message_len(&frames(&[])), None);
    }

    /// A request from 10.0.0.1 whose body says `len` bytes are coming, sends
    /// the five-byte prefix and a little, then never sends the rest.
    fn stalled_upload(len: u32) -> http::Request<Body> {
        let mut first = vec![0u8];
        first.extend_from_slice(&len.to_be_bytes());
        first.extend_from_slice(b"partial");
        let frames =
            futures_util::stream::iter([Ok::<_, tonic::Status>(Frame::data(Bytes::from(first)))])
                .chain(futures_util::stream::pending());
        let mut req = http::Request::new(Body::new(http_body_util::StreamBody::new(frames)));
        req.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some("10.0.0.1:5000".parse().unwrap()),
        });
        req
    }

    /// The layer over a service that counts its calls and answers OK, with a
    /// check that refuses uploads over 1000 bytes.
    fn layer() -> (
        EarlyRefusal<
            impl tower::Service<http::Request<Body>, Response = Reply, Error = Infallible, Future: Send>
            + Clone
            + Send
            + 'static,
        >,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = tower::service_fn(move |_req: http::Request<Body>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok::<_, Infallible>(http::Response::new(Body::empty())))
        });
        let check: Check = Arc::new(|_ip, bytes| match bytes > 1000 {
            true => Err(crate::Error::ResourceExhausted("too large for now".into())),
            false => Ok(()),
        });
        (EarlyRefusal { inner, check }, calls)
    }

    #[tokio::test]
    async fn a_refused_upload_is_answered_from_its_prefix_before_the_rest_arrives() {
        use tower::ServiceExt;
        let (service, calls) = layer();
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            service.clone().oneshot(stalled_upload(11_000_000)),
        )
        .await
        .expect("answered without waiting for the body")
        .unwrap();
        let status = tonic::Status::from_header_map(reply.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        // One the check lets through goes on to the service.
        service.oneshot(stalled_upload(500)).await.unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_read_in_part_is_handed_on_whole() {
        let whole = Bytes::from_static(b"\0\0\0\0\x03abc and more");
        let body = Body::new(http_body_util::Full::new(whole.clone()));
        let (head, rest) = read_prefix(body).await.unwrap();
        let again = Prepended { head, rest }.collect().await.unwrap().to_bytes();
        assert_eq!(again, whole);
    }
}
