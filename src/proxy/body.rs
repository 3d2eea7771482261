//! Body types: bodies are streamed both ways, never buffered.
//!
//! [`LimitedBody`] wraps the client's request body on its way upstream and
//! counts bytes, so a chunked body that grows past the route's `max_body` is
//! cut off (the upstream sees an aborted body) and the client gets 413.
//! [`ProxyBody`] is what keygate answers with: the upstream's streamed body or
//! a small in-memory one (errors).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Error raised when a streamed body passes its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the route's max_body")]
pub struct BodyTooLarge;

/// The client's body, counted against `limit`.
pub struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    /// Set when the limit was hit, so the forwarder answers 413, not 502.
    tripped: Arc<AtomicBool>,
}

impl LimitedBody {
    pub fn new(inner: Incoming, limit: u64) -> (LimitedBody, Arc<AtomicBool>) {
        let tripped = Arc::new(AtomicBool::new(false));
        (
            LimitedBody {
                inner,
                remaining: limit,
                tripped: tripped.clone(),
            },
            tripped,
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
                        self.tripped.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
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

/// A response body: streamed from the upstream, or a complete small one.
pub enum ProxyBody {
    Stream(Incoming),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
