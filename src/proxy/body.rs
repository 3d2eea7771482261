//! Body types: bodies are streamed both ways, never buffered.
//!
//! [`LimitedBody`] wraps the client's request body on its way upstream and
//! counts bytes, so a chunked body that grows past the route's `max_body` is
//! cut off (the upstream sees an aborted body) and the client gets 413; a
//! body the client breaks (a malformed chunk, a disconnect) is 400, not 502.
//! [`ProxyBody`] is what keygate answers with: the upstream's streamed body or
//! a small in-memory one (errors).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use hyper::client::conn::http1::SendRequest;

use super::client;
use super::forward::Lease;
use super::headers::RawFields;
use crate::error::GatewayError;

/// Error raised when a streamed body passes its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the route's max_body")]
pub struct BodyTooLarge;

/// What went wrong with the client's body on its way upstream, if anything,
/// so that a failed forward blames the client (413, 400) and not the
/// upstream (502).
#[derive(Debug, Default)]
pub struct BodyFault(AtomicU8);

impl BodyFault {
    const TOO_LARGE: u8 = 1;
    const BROKEN: u8 = 2;

    /// The error to answer with instead of the forwarder's, if the body was
    /// at fault (`limit` is the route's `max_body`).
    pub fn error(&self, limit: u64) -> Option<GatewayError> {
        match self.0.load(Ordering::Acquire) {
            Self::TOO_LARGE => Some(GatewayError::PayloadTooLarge { limit }),
            Self::BROKEN => Some(GatewayError::BadRequest(
                "the request body is malformed or was cut off",
            )),
            _ => None,
        }
    }
}

/// The client's request body: hyper's, or none (a request read by keygate's
/// own HTTP/1 path, which takes only requests without a body; see
/// [`super::h1`]).
pub enum ClientBody {
    Hyper(Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The client's body, counted against `limit`.
pub struct LimitedBody {
    inner: ClientBody,
    remaining: u64,
    fault: Arc<BodyFault>,
}

impl LimitedBody {
    /// Whether this is a request read by keygate's own HTTP/1 path, which
    /// has no body.
    pub fn is_from_own_path(&self) -> bool {
        matches!(self.inner, ClientBody::Empty)
    }

    pub fn new(inner: ClientBody, limit: u64) -> (LimitedBody, Arc<BodyFault>) {
        let fault = Arc::new(BodyFault::default());
        (
            LimitedBody {
                inner,
                remaining: limit,
                fault: fault.clone(),
            },
            fault,
        )
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.fault.0.store(BodyFault::TOO_LARGE, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.fault.0.store(BodyFault::BROKEN, Ordering::Release);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a streamed response body ends with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream's response body: from keygate's own client connection
/// (requests without a body to plain-HTTP upstreams) or from hyper's.
pub enum UpstreamBody {
    Own(client::ResponseBody),
    Hyper(HyperBody),
}

impl UpstreamBody {
    pub fn hyper(inner: Incoming, lease: Option<Lease<SendRequest<LimitedBody>>>) -> UpstreamBody {
        UpstreamBody::Hyper(HyperBody { inner, lease })
    }

    /// The answer's fields as they came from keygate's own client, not yet
    /// in the response's `HeaderMap` (see [`client::ResponseBody::take_raw_fields`]).
    pub fn take_raw_fields(&mut self) -> Option<RawFields> {
        match self {
            UpstreamBody::Own(b) => b.take_raw_fields(),
            UpstreamBody::Hyper(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Own(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Own(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// A response body from hyper's client. When it has been read to the end,
/// its connection goes back to the pool (see [`super::forward`]); dropped
/// before the end, the connection is closed with it.
pub struct HyperBody {
    inner: Incoming,
    lease: Option<Lease<SendRequest<LimitedBody>>>,
}

impl HyperBody {
    fn release_if_done(&mut self) {
        if self.inner.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.release();
        }
    }
}

impl Body for HyperBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
            }
            Poll::Ready(Some(Ok(_))) => self.release_if_done(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for HyperBody {
    fn drop(&mut self) {
        // Bodiless answers (204, 304, HEAD) are never polled.
        self.release_if_done();
    }
}

/// A response body: streamed from the upstream, or a complete small one.
pub enum ProxyBody {
    Stream(UpstreamBody),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// See [`UpstreamBody::take_raw_fields`].
    pub fn take_raw_fields(&mut self) -> Option<RawFields> {
        match self {
            ProxyBody::Stream(b) => b.take_raw_fields(),
            ProxyBody::Full(_) => None,
        }
    }
}

/// Moves the upstream's fields that travel with the body into the answer's
/// `HeaderMap`, for a writer that only knows the map (hyper's server).
pub fn raw_fields_into_map(resp: &mut http::Response<ProxyBody>) {
    if let Some(raw) = resp.body_mut().take_raw_fields() {
        raw.into_map(resp.headers_mut());
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(inner) => inner.is_end_stream(),
            ProxyBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream(inner) => inner.size_hint(),
            ProxyBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}
