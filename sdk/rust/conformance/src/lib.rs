//! The Rust SDK's conformance service: `conformance.v1.ConformanceService`
//! exactly as `proto/conformance/v1/conformance.proto` documents it, served
//! by the `conformance-plugin` program and by the integration tests.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

/// Code generated from `proto/` by `cargo run -p codegen`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    /// `google.rpc`.
    pub mod google {
        /// `google.rpc`.
        pub mod rpc {
            include!("gen/google.rpc.rs");
        }
    }
    /// `conformance.v1`.
    pub mod conformance {
        /// `conformance.v1`.
        pub mod v1 {
            include!("gen/conformance.v1.rs");
        }
    }
    pub use conformance::v1::*;
}

use pb::conformance_service_server::{ConformanceService, ConformanceServiceServer};
use pb::*;

/// The service, with the observations its calls recorded.
#[derive(Clone, Default)]
pub struct Conformance {
    store: Arc<Store>,
}

#[derive(Default)]
struct Store {
    records: Mutex<HashMap<String, Observation>>,
    recorded: Notify,
}

impl Conformance {
    /// The tonic server, with tonic's own message limits lifted: the SDK's
    /// (or the direct server's) limits are the ones under test.
    pub fn server(self) -> ConformanceServiceServer<Self> {
        ConformanceServiceServer::new(self).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
    }
}

/// Keys a handler never sees through the tunnel (spec §9.1); a direct
/// tonic server hands them over, so they are left out here in both modes.
fn reserved(k: &str) -> bool {
    k.starts_with(':')
        || (k.starts_with("grpc-") && k != "grpc-trace-bin")
        || matches!(k, "content-type" | "te" | "user-agent" | "connection")
}

/// Time left before the call's deadline: the SDK's [`opf::Deadline`], or
/// the `grpc-timeout` header on a direct server.
fn deadline_left<T>(req: &Request<T>) -> Option<Duration> {
    if let Some(d) = req.extensions().get::<opf::Deadline>() {
        return Some(d.remaining());
    }
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn std_duration(d: &prost_types::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// One handler's observation, recorded when the handler returns, or when
/// its future is dropped (cancel, deadline), which counts as cancelled.
struct Call {
    store: Arc<Store>,
    obs: Observation,
    digest: Sha256,
    keys: Vec<String>,
    finished: bool,
}

impl Call {
    fn new<T>(store: &Arc<Store>, method: &str, req: &Request<T>) -> Self {
        let mut md: Vec<MetadataEntry> = Vec::new();
        for kv in req.metadata().iter() {
            let (k, v) = match kv {
                KeyAndValueRef::Ascii(k, v) => (k.as_str(), Bytes::copy_from_slice(v.as_bytes())),
                KeyAndValueRef::Binary(k, v) => (k.as_str(), v.to_bytes().unwrap_or_default()),
            };
            if reserved(k) {
                continue;
            }
            match md.iter_mut().find(|e| e.key == k) {
                Some(e) => e.values.push(v),
                None => md.push(MetadataEntry { key: k.to_owned(), values: vec![v] }),
            }
        }
        md.sort_by(|a, b| a.key.cmp(&b.key));
        Self {
            store: store.clone(),
            obs: Observation {
                method: format!("/conformance.v1.ConformanceService/{method}"),
                deadline_left: deadline_left(req).map(pb_duration),
                metadata: md,
                process_id: std::process::id(),
                ..Default::default()
            },
            digest: Sha256::new(),
            keys: Vec::new(),
            finished: false,
        }
        .with_empty_digest()
    }

    /// The digest of no request at all.
    fn with_empty_digest(mut self) -> Self {
        self.obs.request_digest = Bytes::copy_from_slice(&Sha256::new().finalize());
        self
    }

    fn received(&mut self, payload: &[u8]) {
        self.obs.request_count += 1;
        self.obs.request_bytes += payload.len() as u64;
        self.digest.update((payload.len() as u32).to_be_bytes());
        self.digest.update(payload);
        self.obs.request_digest = Bytes::copy_from_slice(&self.digest.clone().finalize());
    }

    fn key(&mut self, a: &Action) {
        if !a.record_key.is_empty() {
            self.keys.push(a.record_key.clone());
        }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.obs.cancelled = !self.finished;
        if self.keys.is_empty() {
            return;
        }
        let mut r = self.store.records.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            r.insert(k.clone(), self.obs.clone());
        }
        drop(r);
        self.store.recorded.notify_waiters();
    }
}

/// Message `k` of a call's responses, `n` bytes long (see `Action`).
pub fn payload(n: u32, seed: u64, k: u32) -> Bytes {
    let n = n as usize;
    if seed == 0 {
        return (0..n).map(|i| i as u8).collect::<Vec<u8>>().into();
    }
    let mut out = Vec::with_capacity(n + 32);
    let mut j: u32 = 0;
    while out.len() < n {
        let mut h = Sha256::new();
        h.update(seed.to_be_bytes());
        h.update(k.to_be_bytes());
        h.update(j.to_be_bytes());
        out.extend_from_slice(&h.finalize());
        j += 1;
    }
    out.truncate(n);
    out.into()
}

/// Response sizes an action asks for: `None` echoes the request.
fn sizes(a: &Action) -> Vec<Option<u32>> {
    if !a.response_sizes.is_empty() {
        return a.response_sizes.iter().map(|&s| Some(s)).collect();
    }
    let one = (a.response_size > 0).then_some(a.response_size);
    vec![one; a.response_count as usize]
}

/// The size of a unary or client-streaming answer.
fn single_size(a: &Action) -> Option<u32> {
    match a.response_sizes.first() {
        Some(&s) => Some(s),
        None => (a.response_size > 0).then_some(a.response_size),
    }
}

/// The entries as tonic metadata. A value tonic cannot represent (a control
/// character in a text value) fails the call with INTERNAL, as setting it
/// would on any gRPC server: nothing invalid is sent.
fn to_metadata(entries: &[MetadataEntry]) -> Result<MetadataMap, Status> {
    let mut md = MetadataMap::new();
    for e in entries {
        let bad = || Status::internal(format!("invalid metadata {:?}", e.key));
        for v in &e.values {
            if e.key.ends_with("-bin") {
                md.append_bin(
                    MetadataKey::from_bytes(e.key.as_bytes()).map_err(|_| bad())?,
                    MetadataValue::from_bytes(v),
                );
            } else {
                let k = MetadataKey::from_bytes(e.key.as_bytes()).map_err(|_| bad())?;
                let printable = v.iter().all(|&c| (0x20..=0x7e).contains(&c));
                let value = MetadataValue::try_from(&v[..]).ok().filter(|_| printable).ok_or_else(bad)?;
                md.append(k, value);
            }
        }
    }
    Ok(md)
}

/// Where a handler's headers and trailers go: the SDK's
/// [`opf::ResponseMetadata`] in the tunnel, tonic's own places on a direct
/// server (headers on the response, trailers on an error status).
struct Meta {
    handle: Option<opf::ResponseMetadata>,
    headers: MetadataMap,
    trailers: MetadataMap,
}

impl Meta {
    fn new<T>(req: &Request<T>) -> Self {
        Self {
            handle: req.extensions().get::<opf::ResponseMetadata>().cloned(),
            headers: MetadataMap::new(),
            trailers: MetadataMap::new(),
        }
    }

    fn headers(&mut self, entries: &[MetadataEntry]) -> Result<(), Status> {
        if entries.is_empty() {
            return Ok(());
        }
        let md = to_metadata(entries)?;
        match &self.handle {
            Some(h) => h.add_headers(md),
            None => self.headers.as_mut().extend(md.into_headers()),
        }
        Ok(())
    }

    fn trailers(&mut self, entries: &[MetadataEntry]) -> Result<(), Status> {
        if entries.is_empty() {
            return Ok(());
        }
        let md = to_metadata(entries)?;
        match &self.handle {
            Some(h) => h.add_trailers(md),
            None => self.trailers.as_mut().extend(md.into_headers()),
        }
        Ok(())
    }

    fn respond<T>(&mut self, msg: T) -> Response<T> {
        let mut r = Response::new(msg);
        *r.metadata_mut() = std::mem::take(&mut self.headers);
        r
    }

    /// The action's failure, with the trailers when tonic must carry them.
    fn fail(&mut self, a: &Action) -> Option<Status> {
        let f = a.fail.as_ref().filter(|f| f.code != 0)?;
        let code = tonic::Code::from_i32(f.code);
        let details = pb::google::rpc::Status { code: f.code, message: f.message.clone(), details: f.details.clone() };
        let details = if f.details.is_empty() { Bytes::new() } else { details.encode_to_vec().into() };
        let mut md = std::mem::take(&mut self.headers);
        md.as_mut().extend(std::mem::take(&mut self.trailers).into_headers());
        Some(Status::with_details_and_metadata(code, f.message.clone(), details, md))
    }
}

/// Steps 1–3 of an action: headers, sleep, wait for the cancel. A cancel or
/// deadline drops the future, which is how the call stops.
async fn before(a: &Action, meta: &mut Meta, headers: bool) -> Result<(), Status> {
    if headers {
        meta.headers(&a.headers)?;
    }
    if let Some(d) = &a.sleep {
        tokio::time::sleep(std_duration(d)).await;
    }
    if a.wait_for_cancel {
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// Steps 5–7: panic, trailers, fail.
fn after(a: &Action, meta: &mut Meta) -> Result<(), Status> {
    if a.panic {
        panic!("conformance: the action asked for a panic");
    }
    meta.trailers(&a.trailers)?;
    match meta.fail(a) {
        Some(s) => Err(s),
        None => Ok(()),
    }
}

/// A response stream driven by a producer future, which the stream owns:
/// dropping the stream (a cancel, a deadline) drops the producer.
///
/// After each item the stream is pending once, so that tonic's encoder
/// hands the message over at once instead of buffering it with the next
/// ones: a producer that then panics loses nothing it sent.
pub struct Gen<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
    producer: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    flush: bool,
}

impl<T: Send + 'static> Gen<T> {
    fn new<F, Fut>(f: F) -> Self
    where
        F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        Self { rx, producer: Some(Box::pin(f(tx))), flush: false }
    }
}

impl<T> Stream for Gen<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if std::mem::take(&mut self.flush) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        loop {
            if let Poll::Ready(item) = self.rx.poll_recv(cx) {
                self.flush = item.is_some();
                return Poll::Ready(item);
            }
            let Some(p) = self.producer.as_mut() else { return Poll::Pending };
            if p.as_mut().poll(cx).is_ready() {
                self.producer = None;
                continue;
            }
            return Poll::Pending;
        }
    }
}

/// Sends an action's responses; `index` counts the call's messages.
async fn send_all<T>(
    a: &Action,
    echo: &Bytes,
    call: &Call,
    index: &mut u32,
    tx: &mpsc::Sender<Result<T, Status>>,
    make: impl Fn(Bytes, u32, Option<Observation>) -> T,
) -> bool {
    for (i, size) in sizes(a).into_iter().enumerate() {
        if i > 0
            && let Some(d) = &a.message_interval
        {
            tokio::time::sleep(std_duration(d)).await;
        }
        let p = match size {
            Some(n) => payload(n, a.seed, *index),
            None => echo.clone(),
        };
        let obs = (i == 0 && a.observe).then(|| call.obs.clone());
        if tx.send(Ok(make(p, *index, obs))).await.is_err() {
            return false;
        }
        *index += 1;
        // Wait until the stream handed the message to tonic (see Gen).
        let _ = tx.reserve().await;
    }
    true
}

#[tonic::async_trait]
impl ConformanceService for Conformance {
    async fn unary(&self, req: Request<UnaryRequest>) -> Result<Response<UnaryResponse>, Status> {
        let mut call = Call::new(&self.store, "Unary", &req);
        let mut meta = Meta::new(&req);
        let r = req.into_inner();
        let a = r.action.unwrap_or_default();
        call.key(&a);
        call.received(&r.payload);
        if let Err(s) = before(&a, &mut meta, true).await {
            call.finish();
            return Err(s);
        }
        let payload = match single_size(&a) {
            Some(n) => payload(n, a.seed, 0),
            None => r.payload,
        };
        let observation = a.observe.then(|| call.obs.clone());
        let result = after(&a, &mut meta).map(|()| meta.respond(UnaryResponse { payload, observation }));
        call.finish();
        result
    }

    type ServerStreamStream = Gen<ServerStreamResponse>;

    async fn server_stream(
        &self,
        req: Request<ServerStreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let mut call = Call::new(&self.store, "ServerStream", &req);
        let mut meta = Meta::new(&req);
        let r = req.into_inner();
        let a = r.action.unwrap_or_default();
        call.key(&a);
        call.received(&r.payload);
        // Headers are set before the response starts; the rest runs in
        // the stream, so that a cancel drops it.
        if let Err(s) = meta.headers(&a.headers) {
            call.finish();
            return Err(s);
        }
        let headers = std::mem::take(&mut meta.headers);
        let stream = Gen::new(move |tx| async move {
            let _ = before(&a, &mut meta, false).await;
            let mut index = 0;
            let sent = send_all(&a, &r.payload, &call, &mut index, &tx, |payload, index, observation| {
                ServerStreamResponse { payload, index, observation }
            })
            .await;
            if sent && let Err(s) = after(&a, &mut meta) {
                let _ = tx.send(Err(s)).await;
            }
            call.finish();
        });
        let mut resp = Response::new(stream);
        *resp.metadata_mut() = headers;
        Ok(resp)
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<ClientStreamRequest>>,
    ) -> Result<Response<ClientStreamResponse>, Status> {
        let mut call = Call::new(&self.store, "ClientStream", &req);
        let mut meta = Meta::new(&req);
        let mut stream = req.into_inner();
        let mut first: Option<Action> = None;
        let mut last = Bytes::new();
        while let Some(r) = stream.message().await? {
            call.received(&r.payload);
            last = r.payload;
            let a = r.action.unwrap_or_default();
            call.key(&a);
            if let Err(s) = before(&a, &mut meta, true).await.and_then(|()| after(&a, &mut meta)) {
                call.finish();
                return Err(s);
            }
            first.get_or_insert(a);
        }
        let first = first.unwrap_or_default();
        let payload = match single_size(&first) {
            Some(n) => payload(n, first.seed, 0),
            None => last,
        };
        let resp = ClientStreamResponse {
            payload,
            request_count: call.obs.request_count,
            request_bytes: call.obs.request_bytes,
            observation: first.observe.then(|| call.obs.clone()),
            request_digest: call.obs.request_digest.clone(),
        };
        let resp = meta.respond(resp);
        call.finish();
        Ok(resp)
    }

    type BidiStreamStream = Gen<BidiStreamResponse>;

    async fn bidi_stream(
        &self,
        req: Request<Streaming<BidiStreamRequest>>,
    ) -> Result<Response<Self::BidiStreamStream>, Status> {
        let mut call = Call::new(&self.store, "BidiStream", &req);
        let mut meta = Meta::new(&req);
        let mut stream = req.into_inner();
        let stream =
            Gen::new(move |tx| async move {
                let mut index = 0;
                loop {
                    let r = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(s) => {
                            let _ = tx.send(Err(s)).await;
                            call.finish();
                            return;
                        }
                    };
                    call.received(&r.payload);
                    let a = r.action.unwrap_or_default();
                    call.key(&a);
                    // Headers leave with the first response: later ones are
                    // ignored, as the proto says.
                    if let Err(s) = before(&a, &mut meta, index == 0).await {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                    if !send_all(&a, &r.payload, &call, &mut index, &tx, |payload, index, observation| {
                        BidiStreamResponse { payload, index, observation }
                    })
                    .await
                    {
                        break;
                    }
                    if let Err(s) = after(&a, &mut meta) {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                }
                // Direct-server trailers of a successful call are lost: tonic
                // has no place for them.
                call.finish();
            });
        Ok(Response::new(stream))
    }

    async fn get_observation(
        &self,
        req: Request<GetObservationRequest>,
    ) -> Result<Response<GetObservationResponse>, Status> {
        let r = req.into_inner();
        let deadline = r.wait.as_ref().map(|w| tokio::time::Instant::now() + std_duration(w));
        loop {
            let notified = self.store.recorded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(o) = self.store.records.lock().unwrap_or_else(|e| e.into_inner()).get(&r.key) {
                return Ok(Response::new(GetObservationResponse { observation: Some(o.clone()) }));
            }
            let Some(d) = deadline else {
                return Err(Status::not_found(format!("no observation recorded under {:?}", r.key)));
            };
            if tokio::time::timeout_at(d, notified).await.is_err() {
                return Err(Status::not_found(format!("no observation recorded under {:?}", r.key)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(&payload(3, 0, 9)[..], &[0, 1, 2]);
        assert_eq!(payload(300, 0, 0)[256], 0);
        let p = payload(40, 7, 2);
        let mut h = Sha256::new();
        h.update(7u64.to_be_bytes());
        h.update(2u32.to_be_bytes());
        h.update(0u32.to_be_bytes());
        assert_eq!(&p[..32], &h.finalize()[..]);
        assert_eq!(p.len(), 40);
        assert_ne!(payload(40, 7, 3), p);
    }
}
