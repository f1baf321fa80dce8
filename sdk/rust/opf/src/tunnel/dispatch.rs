//! Runs one handler stream through tonic's routing: the tunnelled call
//! becomes an `http::Request` whose body re-frames the request messages,
//! and the `http::Response` is taken apart into headers, messages and the
//! final status (from the trailers, or from the headers of a trailers-only
//! answer).

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Body as _;
use prost::Message as _;
use tokio::sync::Notify;
use tonic::Code;
use tower::ServiceExt as _;

use super::Shared;
use super::defaults::STREAM_QUEUE_BYTES;
use super::frame::{self, RpcStatus};
use super::metadata;
use super::stream::{RequestBody, StreamEntry};
use super::writer::{Outbox, Pushed};
use crate::call::{Deadline, ResponseMetadata};
use crate::proto::google::rpc;
use crate::proto::pluginframework::v1 as pb;

/// The services a plugin serves, as one tonic-routed service.
pub(crate) type Svc =
    tower::util::BoxCloneSyncService<http::Request<tonic::body::Body>, http::Response<tonic::body::Body>, Infallible>;

pub(crate) struct Handler {
    pub(crate) svc: Svc,
    /// Fully qualified names of the services routed by `svc`.
    pub(crate) services: HashSet<String>,
}

/// An accepted `StreamOpen`.
pub(crate) struct Opened {
    pub(crate) method: String,
    pub(crate) metadata: Vec<pb::MetadataEntry>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) received: Instant,
}

/// How the handler ended: the `StreamClose` to send.
struct Finish {
    status: RpcStatus,
    trailers: Vec<pb::MetadataEntry>,
}

impl Finish {
    fn status(code: Code, msg: impl Into<String>) -> Self {
        Self { status: frame::status(code, msg), trailers: Vec::new() }
    }
}

/// Serves one stream until its `StreamClose` is queued: the handler's
/// outcome, its deadline, a cancel from the caller or an abort.
pub(crate) async fn serve(t: Arc<Shared>, entry: Arc<StreamEntry>, space: Arc<Notify>, open: Opened) {
    let id = entry.id;
    let deadline = open.timeout.map(|d| tokio::time::Instant::from_std(open.received + d));
    let work = CatchUnwind(Box::pin(respond(t.clone(), entry.clone(), space, open)));
    let timed = async move {
        match deadline {
            Some(d) => tokio::time::timeout_at(d, work).await.ok(),
            None => Some(work.await),
        }
    };
    let outcome = tokio::select! {
        biased;
        st = entry.stopped() => Err(st),
        r = timed => Ok(r),
    };
    let close = match outcome {
        Err(st) => {
            // Cancelled: what the handler queued is of no use to the caller,
            // and the close must not wait for credit it will never grant.
            if t.remove_stream(id) {
                t.outbox.abort(id, frame::close(id, st, Vec::new()));
            }
            return;
        }
        Ok(None) => frame::close(id, frame::status(Code::DeadlineExceeded, "context deadline exceeded"), Vec::new()),
        Ok(Some(Err(panic))) => {
            tracing::error!(stream = id, "handler panicked: {panic}");
            frame::close(id, frame::status(Code::Internal, format!("handler panicked: {panic}")), Vec::new())
        }
        Ok(Some(Ok(f))) => frame::close(id, f.status, f.trailers),
    };
    // Counted finished before its close is queued (spec §6.7); an aborted
    // stream was removed, and its close sent, by whoever aborted it.
    if t.remove_stream(id) {
        t.outbox.finish(id, close);
    }
}

async fn respond(t: Arc<Shared>, entry: Arc<StreamEntry>, space: Arc<Notify>, open: Opened) -> Finish {
    let id = entry.id;
    let method = open.method;
    let slash = method.rfind('/').unwrap_or(0);
    let (service, name) = (&method[1..slash], &method[slash + 1..]);
    if !t.handler.services.contains(service) {
        return Finish::status(Code::Unimplemented, format!("unknown service {service}"));
    }
    let unknown_method = || Finish::status(Code::Unimplemented, format!("unknown method {name} for service {service}"));
    let Ok(uri) = http::Uri::try_from(method.as_str()) else { return unknown_method() };

    let mut req = http::Request::new(tonic::body::Body::new(RequestBody::new(entry.clone())));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    metadata::to_headers(&open.metadata, req.headers_mut());
    let response_md = ResponseMetadata::default();
    req.extensions_mut().insert(response_md.clone());
    if let Some(timeout) = open.timeout {
        req.headers_mut().insert("grpc-timeout", grpc_timeout(timeout));
        req.extensions_mut().insert(Deadline(open.received + timeout));
    }

    let resp = match t.handler.svc.clone().oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, mut body) = resp.into_parts();
    let outbox = &t.outbox;

    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        // Trailers-only: the headers hold the status and the trailers.
        let mut status = to_rpc(&status);
        if status.code == Code::Unimplemented as i32 && status.message.is_empty() {
            status.message = format!("unknown method {name} for service {service}");
        }
        let headers = response_md.take_headers();
        if !headers.is_empty()
            && let Err(f) = send_headers(outbox, id, headers)
        {
            return f;
        }
        return finish(status, &parts.headers, &response_md);
    }

    let mut headers = match metadata::from_headers(&parts.headers) {
        Ok(h) => Some(h),
        Err(e) => return Finish::status(Code::Internal, format!("response headers: {e}")),
    };
    let max = t.peer_max_message();
    let mut deframer = Deframer::default();
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let f = match next {
            None => return Finish::status(Code::Internal, "server closed the stream without sending trailers"),
            Some(Err(status)) => return Finish { status: to_rpc(&status), trailers: Vec::new() },
            Some(Ok(f)) => f,
        };
        let f = match f.into_data() {
            Ok(data) => {
                deframer.push(data);
                loop {
                    let msg = match deframer.next() {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => return Finish::status(Code::Internal, e),
                    };
                    if let Some(h) = headers.take() {
                        let h = with(h, response_md.take_headers());
                        if !h.is_empty()
                            && let Err(f) = send_headers(outbox, id, h)
                        {
                            return f;
                        }
                    }
                    if msg.len() > max as usize {
                        return Finish::status(
                            Code::ResourceExhausted,
                            format!("trying to send message larger than max ({} vs. {max})", msg.len()),
                        );
                    }
                    if outbox.message(id, msg) == Pushed::Gone {
                        return Finish::status(Code::Cancelled, "stream ended");
                    }
                    while outbox.queued(id) > STREAM_QUEUE_BYTES {
                        space.notified().await;
                    }
                }
                continue;
            }
            Err(f) => f,
        };
        let Ok(trailers) = f.into_trailers() else { continue };
        if !deframer.is_empty() {
            return Finish::status(Code::Internal, "response ended in the middle of a message");
        }
        if let Some(h) = headers.take() {
            let h = with(h, response_md.take_headers());
            if !h.is_empty()
                && let Err(f) = send_headers(outbox, id, h)
            {
                return f;
            }
        }
        let status = match tonic::Status::from_header_map(&trailers) {
            Some(s) => to_rpc(&s),
            None => frame::status(Code::Internal, "trailers without grpc-status"),
        };
        return finish(status, &trailers, &response_md);
    }
}

fn with(mut a: Vec<pb::MetadataEntry>, b: Vec<pb::MetadataEntry>) -> Vec<pb::MetadataEntry> {
    metadata::merge(&mut a, b);
    a
}

/// Queues the response headers, unless they cannot fit in a batch
/// (spec §3.3) or cannot be carried.
fn send_headers(outbox: &Outbox, id: u64, md: Vec<pb::MetadataEntry>) -> Result<(), Finish> {
    let f = frame::frame(id, pb::frame::Kind::Headers(pb::StreamHeaders { metadata: md }));
    if frame::frame_len(&f) > outbox.frame_limit() {
        return Err(Finish::status(Code::ResourceExhausted, "response headers too large for a batch"));
    }
    let Some(pb::frame::Kind::Headers(h)) = f.kind else { unreachable!() };
    outbox.headers(id, h.metadata);
    Ok(())
}

fn finish(status: RpcStatus, trailers: &http::HeaderMap, response_md: &ResponseMetadata) -> Finish {
    match metadata::from_headers(trailers) {
        Ok(t) => Finish { status, trailers: with(t, response_md.take_trailers()) },
        Err(e) => Finish::status(Code::Internal, format!("response trailers: {e}")),
    }
}

/// A tonic status as the tunnel carries it, with the details tonic holds
/// as an encoded `google.rpc.Status`.
fn to_rpc(s: &tonic::Status) -> RpcStatus {
    let details = if s.details().is_empty() {
        Vec::new()
    } else {
        rpc::Status::decode(s.details()).map(|d| d.details).unwrap_or_default()
    };
    RpcStatus { code: s.code() as i32, message: s.message().to_owned(), details }
}

/// The `grpc-timeout` header for a duration: at most 8 digits and a unit.
fn grpc_timeout(d: Duration) -> http::HeaderValue {
    let nanos = d.as_nanos();
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    for (div, unit) in units {
        let v = nanos.div_ceil(div);
        if v < 100_000_000 {
            return http::HeaderValue::try_from(format!("{v}{unit}")).expect("digits and a letter");
        }
    }
    http::HeaderValue::from_static("99999999H")
}

/// Splits gRPC's length-prefixed messages out of the response body,
/// without copying when a message lies in one body frame.
#[derive(Default)]
struct Deframer {
    buf: BytesMut,
    /// Whole frames not yet looked at, when `buf` is empty.
    head: Option<Bytes>,
}

impl Deframer {
    fn push(&mut self, data: Bytes) {
        match self.head.take() {
            None if self.buf.is_empty() => self.head = Some(data),
            None => self.buf.extend_from_slice(&data),
            Some(h) => {
                self.buf.extend_from_slice(&h);
                self.buf.extend_from_slice(&data);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.head.as_ref().is_none_or(|h| h.is_empty())
    }

    fn next(&mut self) -> Result<Option<Bytes>, String> {
        if let Some(h) = &mut self.head {
            match parse(h)? {
                Some(len) => {
                    h.advance(5);
                    let m = h.split_to(len);
                    if h.is_empty() {
                        self.head = None;
                    }
                    return Ok(Some(m));
                }
                None => {
                    let h = self.head.take().unwrap_or_default();
                    self.buf.extend_from_slice(&h);
                }
            }
        }
        match parse(&self.buf)? {
            Some(len) => {
                self.buf.advance(5);
                Ok(Some(self.buf.split_to(len).freeze()))
            }
            None => Ok(None),
        }
    }
}

/// The length of the message at the start of `b`, once it is all there.
fn parse(b: &[u8]) -> Result<Option<usize>, String> {
    if b.len() < 5 {
        return Ok(None);
    }
    if b[0] != 0 {
        return Err("the handler sent a compressed message: compression is not used in the tunnel".into());
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    Ok((b.len() >= 5 + len).then_some(len))
}

/// Turns a panic while polling the handler into an error carrying the
/// panic's message, so that the tunnel survives it.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.get_mut().0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic of a non-string value".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_fit_in_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_nanos(5)), "5n");
        assert_eq!(grpc_timeout(Duration::from_millis(4998)), "4998000u");
        assert_eq!(grpc_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(grpc_timeout(Duration::from_secs(300)), "300000m");
        assert_eq!(grpc_timeout(Duration::from_secs(1_000_000)), "1000000S");
    }

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for m in msgs {
            v.push(0);
            v.extend_from_slice(&(m.len() as u32).to_be_bytes());
            v.extend_from_slice(m);
        }
        v
    }

    #[test]
    fn deframer_splits_across_and_within_frames() {
        let all = framed(&[b"hello", b"", b"world!"]);
        for cut in 0..all.len() {
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for part in [&all[..cut], &all[cut..]] {
                d.push(Bytes::copy_from_slice(part));
                while let Some(m) = d.next().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![&b"hello"[..], b"", b"world!"], "cut at {cut}");
            assert!(d.is_empty());
        }
        let mut d = Deframer::default();
        d.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert!(d.next().is_err());
    }

    #[tokio::test]
    async fn panics_are_caught() {
        let r = CatchUnwind(Box::pin(async { panic!("boom") })).await;
        assert_eq!(r.unwrap_err(), "boom");
        let r = CatchUnwind(Box::pin(async { 7 })).await;
        assert_eq!(r.unwrap(), 7);
    }
}
