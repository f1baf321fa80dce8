//! The receive side of a handler stream: its state machine (spec §6.5),
//! chunk checks (§7.2), the buffer the reader fills without ever waiting,
//! and the request body tonic reads from it, which returns credit as it
//! consumes (§8.1).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;
use tonic::Code;

use super::defaults::CHUNK_COST;
use super::frame::{self, RpcStatus};
use super::writer::Outbox;
use crate::proto::pluginframework::v1 as pb;

/// Handler stream states; CLOSED streams are forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Open,
    HalfClosedRemote,
    Cancelling,
}

/// A chunk as received: `size` is set on a message's first chunk.
struct Chunk {
    size: Option<u32>,
    data: Bytes,
}

struct Recv {
    phase: Phase,
    chunks: VecDeque<Chunk>,
    /// Bytes still due for the message in progress (spec §7.2).
    pending: u64,
    /// Credit the peer has left, as this side counts it.
    peer_credit: i64,
    /// Consumed credit not yet returned.
    unreturned: i64,
    /// The body was dropped: data is discarded as it arrives.
    detached: bool,
    waker: Option<Waker>,
    /// Set once the handler must stop: the cancel or abort status.
    stop: Option<RpcStatus>,
}

/// One handler stream, shared by the reader, its task and its body.
pub(crate) struct StreamEntry {
    pub(crate) id: u64,
    window: i64,
    max_message: u32,
    outbox: Arc<Outbox>,
    recv: Mutex<Recv>,
    stopped: Notify,
}

/// A violation of one stream (spec §6.6): the stream is aborted with it.
pub(crate) type Violation = RpcStatus;

fn violation(code: Code, msg: impl Into<String>) -> Violation {
    frame::status(code, msg)
}

impl StreamEntry {
    pub(crate) fn new(id: u64, window: u32, max_message: u32, outbox: Arc<Outbox>) -> Arc<Self> {
        Arc::new(Self {
            id,
            window: i64::from(window),
            max_message,
            outbox,
            recv: Mutex::new(Recv {
                phase: Phase::Open,
                chunks: VecDeque::new(),
                pending: 0,
                peer_credit: i64::from(window),
                unreturned: 0,
                detached: false,
                waker: None,
                stop: None,
            }),
            stopped: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Recv> {
        self.recv.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// A `StreamMessage` chunk (spec §6.5, §7.2).
    pub(crate) fn on_message(&self, m: pb::StreamMessage) -> Result<(), Violation> {
        let mut r = self.lock();
        match r.phase {
            Phase::Cancelling => return Ok(()),
            Phase::HalfClosedRemote => return Err(violation(Code::Internal, "message after half-close")),
            Phase::Open => {}
        }
        let len = m.data.len() as u64;
        let cost = len as i64 + CHUNK_COST;
        if cost > r.peer_credit {
            return Err(violation(Code::Internal, "flow-control window exceeded"));
        }
        let first = r.pending == 0;
        if first {
            if m.size > self.max_message {
                return Err(violation(
                    Code::ResourceExhausted,
                    format!("received message larger than max ({} vs. {})", m.size, self.max_message),
                ));
            }
            if len > u64::from(m.size) {
                return Err(violation(Code::Internal, "message chunk longer than its declared size"));
            }
            r.pending = u64::from(m.size) - len;
        } else {
            if len == 0 {
                return Err(violation(Code::Internal, "empty continuation chunk"));
            }
            if len > r.pending {
                return Err(violation(Code::Internal, "message chunk longer than its declared size"));
            }
            r.pending -= len;
        }
        r.peer_credit -= cost;
        if r.detached {
            self.consumed(&mut r, cost);
            return Ok(());
        }
        r.chunks.push_back(Chunk { size: first.then_some(m.size), data: m.data });
        if let Some(w) = r.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// `StreamHalfClose`.
    pub(crate) fn on_half_close(&self) -> Result<(), Violation> {
        let mut r = self.lock();
        match r.phase {
            Phase::Cancelling => Ok(()),
            Phase::HalfClosedRemote => Err(violation(Code::Internal, "second half-close")),
            Phase::Open if r.pending > 0 => Err(violation(Code::Internal, "half-close in the middle of a message")),
            Phase::Open => {
                r.phase = Phase::HalfClosedRemote;
                if let Some(w) = r.waker.take() {
                    w.wake();
                }
                Ok(())
            }
        }
    }

    /// `StreamCancel`: the handler stops; its `StreamClose` is still owed.
    /// Returns false when the stream was already cancelling.
    pub(crate) fn on_cancel(&self, status: Option<RpcStatus>) -> bool {
        let mut r = self.lock();
        if r.phase == Phase::Cancelling {
            return false;
        }
        let st = match status {
            Some(s) if s.code != Code::Ok as i32 => s,
            _ => frame::status(Code::Cancelled, "context canceled"),
        };
        r.phase = Phase::Cancelling;
        r.chunks.clear();
        self.stop_locked(&mut r, st);
        true
    }

    /// Stops the handler with `status` (an abort, or the tunnel closing).
    pub(crate) fn stop(&self, status: RpcStatus) {
        let mut r = self.lock();
        r.chunks.clear();
        self.stop_locked(&mut r, status);
    }

    fn stop_locked(&self, r: &mut Recv, status: RpcStatus) {
        if r.stop.is_none() {
            r.stop = Some(status);
        }
        if let Some(w) = r.waker.take() {
            w.wake();
        }
        self.stopped.notify_one();
    }

    /// Waits until the handler must stop; returns the status.
    pub(crate) async fn stopped(&self) -> RpcStatus {
        loop {
            if let Some(s) = self.lock().stop.clone() {
                return s;
            }
            self.stopped.notified().await;
        }
    }

    /// Counts consumed credit and returns it once it reaches a quarter of
    /// the window (spec §8.1), never on a cancelling stream.
    fn consumed(&self, r: &mut Recv, cost: i64) {
        if r.phase == Phase::Cancelling || r.stop.is_some() {
            return;
        }
        r.unreturned += cost;
        if r.unreturned >= self.window / 4 && r.unreturned > 0 {
            let inc = r.unreturned;
            r.unreturned = 0;
            r.peer_credit += inc;
            // The queue can only be full on a peer that stopped reading,
            // and the reader reports that when it queues its next frame.
            let _ = self.outbox.control(frame::window_update(self.id, inc as u32));
        }
    }
}

/// The request body a handler reads: each message re-framed with gRPC's
/// 5-byte prefix. Credit is returned as chunks leave the buffer.
pub(crate) struct RequestBody {
    entry: Arc<StreamEntry>,
    /// Data that follows a prefix already returned.
    stash: Option<Bytes>,
}

impl RequestBody {
    pub(crate) fn new(entry: Arc<StreamEntry>) -> Self {
        Self { entry, stash: None }
    }
}

/// Messages up to this size are copied behind their prefix into one
/// frame; larger ones follow it as their own frames, uncopied.
const COALESCE: usize = 8 << 10;

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if let Some(b) = self.stash.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        }
        let entry = self.entry.clone();
        let mut r = entry.lock();
        if let Some(s) = &r.stop {
            return Poll::Ready(Some(Err(frame::to_tonic(s))));
        }
        if let Some(c) = r.chunks.pop_front() {
            entry.consumed(&mut r, c.data.len() as i64 + CHUNK_COST);
            drop(r);
            let Some(size) = c.size else {
                return Poll::Ready(Some(Ok(http_body::Frame::data(c.data))));
            };
            let prefix = |extra: usize| {
                let mut b = BytesMut::with_capacity(5 + extra);
                b.put_u8(0);
                b.put_u32(size);
                b
            };
            if c.data.len() <= COALESCE {
                let mut b = prefix(c.data.len());
                b.extend_from_slice(&c.data);
                return Poll::Ready(Some(Ok(http_body::Frame::data(b.freeze()))));
            }
            self.stash = Some(c.data);
            return Poll::Ready(Some(Ok(http_body::Frame::data(prefix(0).freeze()))));
        }
        if r.phase == Phase::HalfClosedRemote {
            return Poll::Ready(None);
        }
        r.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let r = self.entry.lock();
        self.stash.is_none() && r.chunks.is_empty() && r.phase == Phase::HalfClosedRemote && r.stop.is_none()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // The handler reads no more: what is buffered and what still comes
        // counts as consumed, so the caller is never stalled by credit.
        let entry = self.entry.clone();
        let mut r = entry.lock();
        r.detached = true;
        let cost: i64 = r.chunks.drain(..).map(|c| c.data.len() as i64 + CHUNK_COST).sum();
        if cost > 0 {
            entry.consumed(&mut r, cost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn msg(size: u32, data: &[u8]) -> pb::StreamMessage {
        pb::StreamMessage { size, data: Bytes::copy_from_slice(data) }
    }

    #[test]
    fn chunk_checks() {
        let o = Outbox::new();
        let e = StreamEntry::new(1, 1024, 100, o.clone());
        assert_eq!(e.on_message(msg(101, b"")).unwrap_err().code, Code::ResourceExhausted as i32);
        assert!(e.on_message(msg(2, b"abc")).unwrap_err().message.contains("longer than its declared"));
        e.on_message(msg(4, b"ab")).unwrap();
        assert!(e.on_half_close().unwrap_err().message.contains("middle of a message"));
        assert!(e.on_message(msg(0, b"")).unwrap_err().message.contains("empty continuation"));
        assert!(e.on_message(msg(0, b"abc")).unwrap_err().message.contains("longer than its declared"));
        e.on_message(msg(0, b"cd")).unwrap();
        e.on_half_close().unwrap();
        assert!(e.on_message(msg(1, b"x")).unwrap_err().message.contains("after half-close"));
        assert!(e.on_half_close().unwrap_err().message.contains("second half-close"));
    }

    #[test]
    fn window_counts_the_chunk_cost() {
        let o = Outbox::new();
        let e = StreamEntry::new(1, 1024, 1 << 20, o);
        // 16 empty messages use the whole window; the 17th overruns it.
        for _ in 0..16 {
            e.on_message(msg(0, b"")).unwrap();
        }
        assert!(e.on_message(msg(0, b"")).unwrap_err().message.contains("window exceeded"));
    }

    #[tokio::test]
    async fn body_reframes_and_returns_credit_at_a_quarter() {
        let o = Outbox::new();
        let e = StreamEntry::new(1, 1024, 1 << 20, o.clone());
        e.on_message(msg(3, b"abc")).unwrap(); // cost 67
        e.on_message(msg(300, &[7; 200])).unwrap(); // cost 264: 331 consumed, above 256
        e.on_message(msg(0, &[7; 100])).unwrap();
        e.on_half_close().unwrap();
        let body = RequestBody::new(e.clone());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..8], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(&bytes[8..13], &[0, 0, 0, 1, 44]);
        assert_eq!(bytes.len(), 8 + 5 + 300);
        // One update of 331 at the second chunk; the last 164 stay unreturned.
        let r = e.lock();
        assert_eq!(r.unreturned, 164);
        assert_eq!(r.peer_credit, 1024 - 67 - 264 - 164 + 331);
    }
}
