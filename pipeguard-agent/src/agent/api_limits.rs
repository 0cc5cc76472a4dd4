//! Size limits on what the API server (or anything posing as it) sends the agent. kube-rs
//! reads a watch stream line by line with no length limit, and a list page whole: one
//! 64 MiB line was 66 MB more in the agent. Here every watch line (one event, one object)
//! and every other response body is cut off past its limit, as an error: the watcher
//! retries with backoff, the caches keep their last state, and a watch that keeps failing
//! makes the agent not ready.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

/// One watch event at most: the largest object etcd stores by default is 1.5 MiB.
pub const MAX_WATCH_LINE: usize = 16 << 20;
/// One list page at most (the watcher lists 500 objects a page).
pub const MAX_BODY: usize = 512 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps the kube client's HTTP service.
#[derive(Clone, Copy, Default)]
pub struct LimitLayer;

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit { inner }
    }
}

#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
}

impl<S, ReqBody, B> tower::Service<Request<ReqBody>> for Limit<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<Limited<B>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| Limited {
                inner,
                watch,
                line: 0,
                total: 0,
            }))
        })
    }
}

/// A response body that fails once a line (watch) or the whole body (otherwise) is too long.
pub struct Limited<B> {
    inner: B,
    watch: bool,
    /// Bytes since the last newline.
    line: usize,
    total: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("the API server sent {what} longer than {limit} bytes; refused")]
pub struct TooLarge {
    what: &'static str,
    limit: usize,
}

impl<B> Limited<B> {
    fn count(&mut self, data: &[u8]) -> Result<(), TooLarge> {
        if self.watch {
            self.line = match data.iter().rposition(|b| *b == b'\n') {
                Some(last) => data.len() - last - 1,
                None => self.line + data.len(),
            };
            if self.line > MAX_WATCH_LINE {
                return Err(TooLarge {
                    what: "a watch event",
                    limit: MAX_WATCH_LINE,
                });
            }
        } else {
            self.total += data.len();
            if self.total > MAX_BODY {
                return Err(TooLarge {
                    what: "a response",
                    limit: MAX_BODY,
                });
            }
        }
        Ok(())
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.count(data)
                {
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(watch: bool) -> Limited<()> {
        Limited {
            inner: (),
            watch,
            line: 0,
            total: 0,
        }
    }

    #[test]
    fn a_watch_line_is_limited_across_chunks_and_reset_by_newlines() {
        let mut l = limited(true);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..16 {
            l.count(&chunk).unwrap();
        }
        assert!(l.count(b"x").is_err(), "16 MiB + 1 without a newline");
        let mut l = limited(true);
        for _ in 0..100 {
            l.count(&chunk).unwrap();
            l.count(b"}\n{").unwrap();
        }
    }

    #[test]
    fn other_bodies_are_limited_in_total() {
        let mut l = limited(false);
        let chunk = vec![b'\n'; 1 << 20];
        for _ in 0..512 {
            l.count(&chunk).unwrap();
        }
        assert!(l.count(b"\n").is_err());
    }
}
