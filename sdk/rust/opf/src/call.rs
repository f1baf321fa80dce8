//! What a handler can learn about, and add to, a call that came through the
//! tunnel, beyond what tonic's `Request` and `Response` carry.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

use crate::proto::pluginframework::v1::MetadataEntry;
use crate::tunnel::metadata;

/// The caller's deadline, in the request's extensions when the call has
/// one: `request.extensions().get::<opf::Deadline>()`.
///
/// The SDK enforces it (tonic enforces `grpc-timeout` only in its own
/// transport): when it passes, the handler's future is dropped and the
/// call ends with `DEADLINE_EXCEEDED`. The `grpc-timeout` header is passed
/// to the handler too, as on a direct call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Response headers and trailers a handler may set in any outcome, in the
/// request's extensions: `request.extensions().get::<opf::ResponseMetadata>()`.
///
/// tonic sends a `Response`'s metadata as headers and a failing `Status`'s
/// metadata as trailers, but has no way to send headers with an error, or
/// trailers with a success. This handle does both, as grpc-go's
/// `SetHeader` and `SetTrailer` do. Headers set here leave with the first
/// response message (or with the end of the call); trailers with the
/// status. It is a cheap clone of one shared value.
#[derive(Debug, Clone, Default)]
pub struct ResponseMetadata {
    inner: Arc<Mutex<(Vec<MetadataEntry>, Vec<MetadataEntry>)>>,
}

impl ResponseMetadata {
    /// Adds response headers. Headers added after the first response
    /// message has left are sent as nothing.
    pub fn add_headers(&self, md: MetadataMap) {
        self.add(md, true);
    }

    /// Adds response trailers.
    pub fn add_trailers(&self, md: MetadataMap) {
        self.add(md, false);
    }

    fn add(&self, md: MetadataMap, headers: bool) {
        // Values tonic accepted but the tunnel cannot carry are dropped.
        let entries = metadata::from_headers(&md.into_headers()).unwrap_or_default();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        metadata::merge(if headers { &mut g.0 } else { &mut g.1 }, entries);
    }

    pub(crate) fn take_headers(&self) -> Vec<MetadataEntry> {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).0)
    }

    pub(crate) fn take_trailers(&self) -> Vec<MetadataEntry> {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).1)
    }
}
