//! The outgoing side of a tunnel: every frame to send is queued here and
//! leaves in batches, on the `Connect` call's HTTP/2 stream. Control frames
//! go first; then streams with something sendable take turns, one frame
//! each, so that one large message does not hold back the others (spec
//! §3.4). The outbox owns each stream's send credit (spec §8.1).
//!
//! Who sends: the task that queued the frames, once its poll ends (the
//! tunnel task and the stream tasks run under [`Flushed`]), so that a call's
//! answer reaches the HTTP/2 connection without waking another task on the
//! way; frames queued anywhere else, and batches that wait for HTTP/2 send
//! capacity, are sent by the tunnel's writer task ([`write`]).

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;
use tonic::Code;

use super::defaults::*;
use super::frame::{self, TunnelError, frame_len};
use crate::proto::pluginframework::v1 as pb;
use pb::frame::Kind;

/// What a stream queues, in order.
enum Item {
    Headers(Vec<pb::MetadataEntry>),
    /// A message; `sent` bytes of it have left, `started` once its first
    /// chunk has (an empty message is one chunk).
    Message {
        data: Bytes,
        sent: usize,
        started: bool,
    },
    Close(pb::Frame),
}

struct OutStream {
    credit: i64,
    items: VecDeque<Item>,
    /// Message bytes queued and not yet sent.
    queued: usize,
    /// Whether the stream is in `ready`.
    ready: bool,
    /// A close is queued: later items are dropped.
    closing: bool,
    /// Woken when `queued` falls to the stream's queue bound.
    space: Arc<Notify>,
}

impl OutStream {
    /// Whether the front item can be sent now.
    fn sendable(&self) -> bool {
        match self.items.front() {
            None => false,
            Some(Item::Message { data, sent, .. }) => {
                if data.len() == *sent {
                    self.credit >= CHUNK_COST
                } else {
                    self.credit > CHUNK_COST
                }
            }
            Some(_) => true,
        }
    }
}

struct State {
    control: VecDeque<pb::Frame>,
    /// The latest unanswered ping (pongs are coalesced, spec §11).
    pong: Option<u64>,
    streams: HashMap<u64, OutStream>,
    /// Streams whose front item is sendable, in turn order.
    ready: VecDeque<u64>,
    /// Largest batch to build: 64 KiB until registered (spec §3.3).
    batch_limit: usize,
    /// Credit each new stream starts with: the peer's window.
    initial_credit: i64,
    /// Send everything queued, then end.
    finishing: bool,
    closed: bool,
    /// The writer task, once it has run.
    writer: Option<Waker>,
    /// The request stream has ended (or is gone): nothing more leaves.
    ended: bool,
}

/// The sending half of the `Connect` call.
struct Sink {
    stream: h2::SendStream<Bytes>,
    /// The rest of the batch being sent.
    pieces: VecDeque<Bytes>,
}

thread_local! {
    /// The outbox whose frames the task being polled on this thread sends
    /// at the end of its poll (see [`Flushed`]).
    static FLUSHING: Cell<*const Outbox> = const { Cell::new(std::ptr::null()) };
}

/// The queues of one tunnel, shared by the reader, the stream tasks and
/// the `Connect` call's request stream.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Notified when the request stream has ended.
    ended: Notify,
    /// Held by whoever sends; `None` until the call is open.
    sink: Mutex<Option<Sink>>,
    /// Frames were queued, or a sender wanted the sink, since the last
    /// sender began.
    pending: AtomicBool,
}

/// What `push` reports.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// The stream is closing or gone: nothing more of it is sent.
    Gone,
}

impl Outbox {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                control: VecDeque::new(),
                pong: None,
                streams: HashMap::new(),
                ready: VecDeque::new(),
                batch_limit: UNREGISTERED_BATCH_LIMIT,
                initial_credit: i64::from(DEFAULT_INITIAL_WINDOW_SIZE),
                finishing: false,
                closed: false,
                writer: None,
                ended: false,
            }),
            ended: Notify::new(),
            sink: Mutex::new(None),
            pending: AtomicBool::new(false),
        })
    }

    /// Releases the lock after queuing: the frames leave at the end of
    /// this task's poll if it runs under [`Flushed`] for this outbox, else
    /// the writer task is woken to send them.
    fn release(&self, s: MutexGuard<'_, State>) {
        let writer = if FLUSHING.get() == std::ptr::from_ref(self) { None } else { s.writer.clone() };
        drop(s);
        self.pending.store(true, Ordering::SeqCst);
        if let Some(w) = writer {
            w.wake();
        }
    }

    /// Hands the outbox the call's sending half: from here on, batches leave.
    pub(crate) fn attach(&self, stream: h2::SendStream<Bytes>) {
        *lock(&self.sink) = Some(Sink { stream, pieces: VecDeque::new() });
        self.pending.store(true, Ordering::SeqCst);
    }

    /// Sends what can be sent now, unless another task is sending: that one
    /// then sends it too.
    fn flush(&self) {
        loop {
            let mut sink = match self.sink.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    self.pending.store(true, Ordering::SeqCst);
                    return;
                }
            };
            self.pending.store(false, Ordering::SeqCst);
            self.send(&mut sink);
            drop(sink);
            if !self.pending.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Builds batches and gives them to HTTP/2 while it has send capacity;
    /// when it has none, the writer task is woken once it does.
    fn send(&self, sink: &mut Option<Sink>) {
        let Some(sk) = sink else { return };
        loop {
            if sk.pieces.is_empty() {
                let mut s = self.lock();
                match build(&mut s) {
                    Next::Batch(frames) => {
                        drop(s);
                        encode_batch(frames, &mut sk.pieces);
                    }
                    Next::Idle => return,
                    Next::End => {
                        drop(s);
                        // End of stream: the operator sees the tunnel half-closed.
                        let _ = sk.stream.send_data(Bytes::new(), true);
                        return self.end_stream(sink);
                    }
                }
            }
            // Like hyper's request bodies: a piece may go beyond the
            // capacity (HTTP/2 holds the rest), the next waits for it.
            if sk.stream.capacity() == 0 {
                sk.stream.reserve_capacity(1);
                if sk.stream.capacity() == 0 {
                    let Some(w) = self.lock().writer.clone() else { return };
                    match sk.stream.poll_capacity(&mut Context::from_waker(&w)) {
                        Poll::Pending => return,
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(Some(Err(_)) | None) => return self.end_stream(sink),
                    }
                }
            }
            let piece = sk.pieces.pop_front().expect("a batch has pieces");
            if sk.stream.send_data(piece, false).is_err() {
                // The call is gone: its end reaches the tunnel task as the
                // end of the response.
                return self.end_stream(sink);
            }
        }
    }

    /// Nothing more leaves: the sending half is dropped.
    fn end_stream(&self, sink: &mut Option<Sink>) {
        *sink = None;
        self.lock().ended = true;
        self.ended.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Applies the peer's window (from its `Hello`) to streams opened later.
    pub(crate) fn set_peer_window(&self, window: u32) {
        self.lock().initial_credit = i64::from(window);
    }

    /// Raises the batch limit to the peer's, once registered.
    pub(crate) fn set_registered(&self, peer_max_batch: u32) {
        self.lock().batch_limit =
            (peer_max_batch as usize).saturating_sub(BATCH_RESERVE).max(UNREGISTERED_BATCH_LIMIT - BATCH_RESERVE);
    }

    /// The largest frame that may be queued now.
    pub(crate) fn frame_limit(&self) -> usize {
        self.lock().batch_limit
    }

    /// Queues a control frame. Overflow is a tunnel error (spec §3.4).
    pub(crate) fn control(&self, f: pb::Frame) -> Result<(), TunnelError> {
        let mut s = self.lock();
        if s.closed {
            return Ok(());
        }
        if s.control.len() >= CONTROL_QUEUE_MAX {
            return Err(TunnelError::new(
                Code::ResourceExhausted,
                "tunnel control queue full: the peer is not reading",
            ));
        }
        s.control.push_back(f);
        self.release(s);
        Ok(())
    }

    /// Queues a frame ahead of every other, whatever the bound (a
    /// `GoAway` that reports the overflow itself).
    pub(crate) fn urgent(&self, f: pb::Frame) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        s.control.push_front(f);
        self.release(s);
    }

    /// Queues the answer to a ping; only the latest nonce is kept.
    pub(crate) fn pong(&self, nonce: u64) {
        let mut s = self.lock();
        s.pong = Some(nonce);
        self.release(s);
    }

    /// Starts the send side of a stream; returns what wakes its producer.
    pub(crate) fn open(&self, id: u64) -> Arc<Notify> {
        let space = Arc::new(Notify::new());
        let mut s = self.lock();
        let credit = s.initial_credit;
        s.streams.insert(
            id,
            OutStream { credit, items: VecDeque::new(), queued: 0, ready: false, closing: false, space: space.clone() },
        );
        space
    }

    /// Queues headers or a message on a stream.
    fn push(&self, id: u64, item: Item) -> Pushed {
        let mut s = self.lock();
        if s.closed {
            return Pushed::Gone;
        }
        let Some(st) = s.streams.get_mut(&id) else { return Pushed::Gone };
        if st.closing {
            return Pushed::Gone;
        }
        if let Item::Message { data, .. } = &item {
            st.queued += data.len();
        }
        st.items.push_back(item);
        let wake = Self::mark_ready(&mut s, id);
        if wake {
            self.release(s);
        }
        Pushed::Queued
    }

    pub(crate) fn headers(&self, id: u64, md: Vec<pb::MetadataEntry>) -> Pushed {
        self.push(id, Item::Headers(md))
    }

    pub(crate) fn message(&self, id: u64, data: Bytes) -> Pushed {
        self.push(id, Item::Message { data, sent: 0, started: false })
    }

    /// Message bytes of a stream not yet sent (0 once it is gone).
    pub(crate) fn queued(&self, id: u64) -> usize {
        self.lock().streams.get(&id).map_or(0, |s| s.queued)
    }

    /// Queues the stream's `StreamClose` after what it queued before. A
    /// close too large for a batch goes without its trailers, as
    /// RESOURCE_EXHAUSTED (spec §3.3).
    pub(crate) fn finish(&self, id: u64, close: pb::Frame) {
        self.end(id, close, false);
    }

    /// Drops what the stream queued and queues its `StreamClose` (spec
    /// §6.6).
    pub(crate) fn abort(&self, id: u64, close: pb::Frame) {
        self.end(id, close, true);
    }

    fn end(&self, id: u64, mut close: pb::Frame, drop_queued: bool) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if frame_len(&close) > s.batch_limit {
            close = frame::close(id, frame::status(Code::ResourceExhausted, "trailers too large for a batch"), vec![]);
        }
        let Some(st) = s.streams.get_mut(&id) else {
            // A stream the writer never saw (refused): the close goes alone.
            s.control.push_back(close);
            self.release(s);
            return;
        };
        if st.closing {
            return;
        }
        if drop_queued {
            st.items.clear();
            st.queued = 0;
        }
        st.closing = true;
        st.items.push_back(Item::Close(close));
        st.space.notify_one();
        let wake = Self::mark_ready(&mut s, id);
        if wake {
            self.release(s);
        }
    }

    /// Drops the data a stream still has queued, keeping its close: the
    /// caller cancelled after the handler finished.
    pub(crate) fn drop_data(&self, id: u64) {
        let mut s = self.lock();
        let Some(st) = s.streams.get_mut(&id) else { return };
        st.items.retain(|i| matches!(i, Item::Close(_)));
        st.queued = 0;
        st.space.notify_one();
        let wake = Self::mark_ready(&mut s, id);
        if wake {
            self.release(s);
        }
    }

    /// Adds credit from a `WindowUpdate`. `Err` when it would overflow the
    /// window (spec §8.1); the credit is not added then.
    pub(crate) fn add_credit(&self, id: u64, increment: u32) -> Result<(), ()> {
        let mut s = self.lock();
        let Some(st) = s.streams.get_mut(&id) else { return Ok(()) };
        let credit = st.credit + i64::from(increment);
        if credit > i64::from(MAX_SETTING) {
            return Err(());
        }
        st.credit = credit;
        let wake = Self::mark_ready(&mut s, id);
        if wake {
            self.release(s);
        }
        Ok(())
    }

    /// Puts a stream in the turn order if it has something sendable;
    /// returns whether the writer must be woken.
    fn mark_ready(s: &mut State, id: u64) -> bool {
        let Some(st) = s.streams.get_mut(&id) else { return false };
        if st.ready || !st.sendable() {
            return false;
        }
        st.ready = true;
        s.ready.push_back(id);
        true
    }

    /// Sends what is queued, then ends the `Connect` call's sending side.
    pub(crate) fn finish_all(&self) {
        let mut s = self.lock();
        s.finishing = true;
        self.release(s);
    }

    /// Stops at once; queued frames are dropped.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.control.clear();
        s.ready.clear();
        for st in s.streams.values() {
            st.space.notify_one();
        }
        s.streams.clear();
        self.release(s);
    }

    /// Builds the next batch, or says why there is none.
    #[cfg(test)]
    fn next_batch(&self) -> Next {
        build(&mut self.lock())
    }

    /// Waits until the request stream has ended: everything queued has
    /// left, after `finish_all`, or the tunnel was closed.
    pub(crate) async fn ended(&self) {
        loop {
            if self.lock().ended {
                return;
            }
            // A single waiter: a notification before this keeps its permit.
            self.ended.notified().await;
        }
    }
}

/// Builds the next batch from the queues, or says why there is none.
fn build(s: &mut State) -> Next {
    if s.closed {
        return Next::End;
    }
    let limit = s.batch_limit;
    let mut frames = Vec::new();
    let mut size = 0;
    if let Some(nonce) = s.pong.take() {
        let f = frame::frame(0, Kind::Pong(pb::Pong { nonce }));
        size += frame_len(&f);
        frames.push(f);
    }
    while frames.len() < MAX_FRAMES_PER_BATCH {
        let Some(f) = s.control.front() else { break };
        let n = frame_len(f);
        if !frames.is_empty() && size + n > limit {
            return Next::Batch(frames);
        }
        size += n;
        frames.push(s.control.pop_front().expect("front exists"));
    }
    while frames.len() < MAX_FRAMES_PER_BATCH {
        let Some(id) = s.ready.pop_front() else { break };
        let Some(st) = s.streams.get_mut(&id) else { continue };
        st.ready = false;
        match take_frame(id, st, limit - size.min(limit)) {
            Taken::Frame(f, n, more) => {
                size += n;
                frames.push(f);
                if matches!(frames.last().and_then(|f| f.kind.as_ref()), Some(Kind::Close(_))) {
                    s.streams.remove(&id);
                    continue;
                }
                if more {
                    st.ready = true;
                    s.ready.push_back(id);
                }
            }
            Taken::Full => {
                st.ready = true;
                s.ready.push_front(id);
                break;
            }
            Taken::Blocked => {}
        }
    }
    if !frames.is_empty() {
        return Next::Batch(frames);
    }
    if s.finishing && s.control.is_empty() && s.streams.values().all(|st| st.items.is_empty()) {
        return Next::End;
    }
    Next::Idle
}

enum Next {
    Batch(Vec<pb::Frame>),
    Idle,
    End,
}

enum Taken {
    /// A frame, its size in the batch, and whether the stream has more to
    /// send now.
    Frame(pb::Frame, usize, bool),
    /// The frame does not fit in what is left of the batch.
    Full,
    /// Nothing sendable (no credit).
    Blocked,
}

/// Takes one frame from a stream, within `room` bytes of batch.
fn take_frame(id: u64, st: &mut OutStream, room: usize) -> Taken {
    let Some(item) = st.items.front_mut() else { return Taken::Blocked };
    let f = match item {
        Item::Headers(_) | Item::Close(_) => {
            let f = match st.items.pop_front() {
                Some(Item::Headers(md)) => frame::frame(id, Kind::Headers(pb::StreamHeaders { metadata: md })),
                Some(Item::Close(f)) => f,
                _ => unreachable!("front was headers or close"),
            };
            let n = frame_len(&f);
            if n > room {
                // Put it back: it leaves in the next batch.
                st.items.push_front(match f.kind {
                    Some(Kind::Headers(h)) => Item::Headers(h.metadata),
                    _ => Item::Close(f),
                });
                return Taken::Full;
            }
            f
        }
        Item::Message { data, sent, started } => {
            let rest = data.len() - *sent;
            let by_credit = (st.credit - CHUNK_COST).max(0) as usize;
            let by_room = room.saturating_sub(CHUNK_OVERHEAD);
            let n = rest.min(by_credit).min(MAX_CHUNK).min(by_room);
            if rest > 0 && n == 0 {
                return if by_credit == 0 { Taken::Blocked } else { Taken::Full };
            }
            if rest == 0 && (st.credit < CHUNK_COST || room < CHUNK_OVERHEAD) {
                return if st.credit < CHUNK_COST { Taken::Blocked } else { Taken::Full };
            }
            let size = if *started { 0 } else { data.len() as u32 };
            let chunk = data.slice(*sent..*sent + n);
            *sent += n;
            *started = true;
            st.credit -= n as i64 + CHUNK_COST;
            st.queued -= n;
            let done = *sent == data.len();
            if done {
                st.items.pop_front();
            }
            if st.queued <= STREAM_QUEUE_BYTES {
                st.space.notify_one();
            }
            frame::frame(id, Kind::Message(pb::StreamMessage { size, data: chunk }))
        }
    };
    let n = frame_len(&f);
    Taken::Frame(f, n, st.sendable())
}

/// Chunks of at least this many bytes leave as pieces of their own, not
/// copied into the batch's encoding.
const UNCOPIED_CHUNK: usize = 16 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never happens while the lock is held; recover anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tunnel's writer task: sends what was queued outside a [`Flushed`]
/// task, and what waited for HTTP/2 send capacity. It ends with the
/// request stream: once the tunnel closes or, after `finish_all`, once
/// everything queued has left.
pub(crate) async fn write(outbox: Arc<Outbox>) {
    std::future::poll_fn(|cx| {
        let mut s = outbox.lock();
        if s.ended {
            return Poll::Ready(());
        }
        if !s.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.writer = Some(cx.waker().clone());
        }
        drop(s);
        outbox.flush();
        if outbox.lock().ended { Poll::Ready(()) } else { Poll::Pending }
    })
    .await
}

/// A task that sends what it queued in `outbox` at the end of each of its
/// polls: the frames of one poll leave together, with no other task woken.
pub(crate) struct Flushed<F> {
    outbox: Arc<Outbox>,
    inner: Pin<Box<F>>,
}

impl<F> Flushed<F> {
    pub(crate) fn new(outbox: Arc<Outbox>, inner: F) -> Self {
        Self { outbox, inner: Box::pin(inner) }
    }
}

impl<F: Future> Future for Flushed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Restores the thread's flushing outbox, even if the poll panics.
        struct Restore(*const Outbox);
        impl Drop for Restore {
            fn drop(&mut self) {
                FLUSHING.set(self.0);
            }
        }
        let this = self.get_mut();
        let restore = Restore(FLUSHING.replace(Arc::as_ptr(&this.outbox)));
        let r = this.inner.as_mut().poll(cx);
        drop(restore);
        if this.outbox.pending.load(Ordering::SeqCst) {
            this.outbox.flush();
        }
        r
    }
}

/// Encodes a batch as a gRPC message (uncompressed): its 5-byte prefix and
/// the `ConnectRequest`, in pieces, the data of large chunks as they are.
fn encode_batch(frames: Vec<pb::Frame>, out: &mut VecDeque<Bytes>) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let uncopied = |f: &pb::Frame| match &f.kind {
        Some(Kind::Message(m)) if m.data.len() >= UNCOPIED_CHUNK => m.data.len(),
        _ => 0,
    };
    let total: usize = frames.iter().map(frame_len).sum();
    let copied = total - frames.iter().map(uncopied).sum::<usize>();
    let mut buf = BytesMut::with_capacity(5 + copied);
    buf.put_u8(0);
    buf.put_u32(total as u32);
    for f in frames {
        let pb::Frame { stream_id, kind: Some(Kind::Message(m)) } = f else {
            prost::encoding::message::encode(1, &f, &mut buf);
            continue;
        };
        if m.data.len() < UNCOPIED_CHUNK {
            let f = frame::frame(stream_id, Kind::Message(m));
            prost::encoding::message::encode(1, &f, &mut buf);
            continue;
        }
        // ConnectRequest.frames = 1; Frame.stream_id = 1, Frame.message =
        // 12; StreamMessage.size = 1, StreamMessage.data = 2.
        let n = m.data.len();
        let size_len = if m.size == 0 { 0 } else { 1 + encoded_len_varint(u64::from(m.size)) };
        let message_len = size_len + 1 + encoded_len_varint(n as u64) + n;
        let id_len = if stream_id == 0 { 0 } else { 1 + encoded_len_varint(stream_id) };
        let frame_len = id_len + 1 + encoded_len_varint(message_len as u64) + message_len;
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(frame_len as u64, &mut buf);
        if stream_id != 0 {
            encode_key(1, WireType::Varint, &mut buf);
            encode_varint(stream_id, &mut buf);
        }
        encode_key(12, WireType::LengthDelimited, &mut buf);
        encode_varint(message_len as u64, &mut buf);
        if m.size != 0 {
            encode_key(1, WireType::Varint, &mut buf);
            encode_varint(u64::from(m.size), &mut buf);
        }
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(n as u64, &mut buf);
        out.push_back(buf.split().freeze());
        out.push_back(m.data);
    }
    if !buf.is_empty() {
        out.push_back(buf.freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(frames: &[pb::Frame]) -> Vec<(u64, u32)> {
        frames.iter().map(|f| (f.stream_id, frame::kind_number(f.kind.as_ref().unwrap()))).collect()
    }

    fn batch(o: &Outbox) -> Vec<pb::Frame> {
        match o.next_batch() {
            Next::Batch(f) => f,
            _ => vec![],
        }
    }

    fn data_len(f: &pb::Frame) -> usize {
        match &f.kind {
            Some(Kind::Message(m)) => m.data.len(),
            _ => panic!("not a message"),
        }
    }

    #[test]
    fn control_first_then_streams_in_turn() {
        let o = Outbox::new();
        o.set_registered(4 << 20);
        o.open(1);
        o.open(3);
        o.message(1, Bytes::from(vec![1; 10]));
        o.message(1, Bytes::from(vec![1; 10]));
        o.message(3, Bytes::from(vec![3; 10]));
        o.control(frame::window_update(5, 9)).unwrap();
        o.pong(4);
        o.pong(7);
        let b = batch(&o);
        assert_eq!(kinds(&b), vec![(0, 7), (5, 16), (1, 12), (3, 12), (1, 12)]);
        assert!(matches!(&b[0].kind, Some(Kind::Pong(p)) if p.nonce == 7));
    }

    #[test]
    fn chunks_are_bounded_by_credit_with_the_chunk_cost() {
        let o = Outbox::new();
        o.set_peer_window(1024);
        o.set_registered(4 << 20);
        o.open(1);
        o.message(1, Bytes::from(vec![0; 3000]));
        let b = batch(&o);
        assert_eq!(b.len(), 1);
        assert_eq!(data_len(&b[0]), 1024 - 64);
        assert!(matches!(o.next_batch(), Next::Idle), "no credit left");
        o.add_credit(1, 64).unwrap();
        assert!(matches!(o.next_batch(), Next::Idle), "64 of credit sends no data");
        o.add_credit(1, 100).unwrap();
        let b = batch(&o);
        assert_eq!(data_len(&b[0]), 100);
        assert!(matches!(&b[0].kind, Some(Kind::Message(m)) if m.size == 0), "continuation has no size");
        o.add_credit(1, MAX_SETTING).unwrap();
        assert!(o.add_credit(1, 1).is_err(), "2^31 overflows");
    }

    #[test]
    fn empty_messages_need_64_of_credit() {
        let o = Outbox::new();
        o.set_peer_window(1024);
        o.open(1);
        for _ in 0..17 {
            o.message(1, Bytes::new());
        }
        assert_eq!(batch(&o).len(), 16);
        assert!(matches!(o.next_batch(), Next::Idle));
    }

    #[test]
    fn batches_stay_under_the_limit() {
        let o = Outbox::new();
        o.set_peer_window(MAX_SETTING);
        o.open(1);
        o.message(1, Bytes::from(vec![0; 200_000]));
        let mut total = 0;
        while let Next::Batch(b) = o.next_batch() {
            let n: usize = b.iter().map(frame_len).sum();
            assert!(n <= UNREGISTERED_BATCH_LIMIT, "batch of {n}");
            total += b.iter().map(data_len).sum::<usize>();
        }
        assert_eq!(total, 200_000);
    }

    #[test]
    fn frames_per_batch_are_capped() {
        let o = Outbox::new();
        for i in 0..5000 {
            o.control(frame::window_update(2 * i + 1, 1)).unwrap();
        }
        assert_eq!(batch(&o).len(), MAX_FRAMES_PER_BATCH);
        assert_eq!(batch(&o).len(), 5000 - MAX_FRAMES_PER_BATCH);
    }

    #[test]
    fn abort_drops_queued_frames_and_close_ends_the_stream() {
        let o = Outbox::new();
        o.open(1);
        o.headers(1, vec![]);
        o.message(1, Bytes::from_static(b"x"));
        o.abort(1, frame::close(1, frame::status(Code::Internal, "boom"), vec![]));
        assert_eq!(o.message(1, Bytes::new()), Pushed::Gone);
        assert_eq!(kinds(&batch(&o)), vec![(1, 15)]);
        assert_eq!(o.queued(1), 0);
        assert!(matches!(o.next_batch(), Next::Idle));
    }

    #[test]
    fn batches_encode_as_prost_does_with_large_chunks_uncopied() {
        let big = Bytes::from(vec![7; UNCOPIED_CHUNK + 3]);
        let frames = vec![
            frame::window_update(5, 9),
            frame::frame(1, Kind::Message(pb::StreamMessage { size: 300, data: Bytes::from(vec![1; 300]) })),
            frame::frame(3, Kind::Message(pb::StreamMessage { size: 1 << 20, data: big.clone() })),
            frame::frame(1 << 40, Kind::Message(pb::StreamMessage { size: 0, data: big.clone() })),
            frame::frame(0, Kind::Pong(pb::Pong { nonce: 3 })),
            frame::frame(7, Kind::Message(pb::StreamMessage { size: 0, data: Bytes::new() })),
        ];
        let want = prost::Message::encode_to_vec(&pb::ConnectRequest { frames: frames.clone() });
        let mut pieces = VecDeque::new();
        encode_batch(frames, &mut pieces);
        assert_eq!(pieces.len(), 5, "prefix and frames, data, frames, data, rest");
        assert!(pieces.iter().any(|p| p.as_ptr() == big.as_ptr()), "the chunk is not copied");
        let got: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(got[0], 0);
        assert_eq!(u32::from_be_bytes(got[1..5].try_into().unwrap()) as usize, want.len());
        assert_eq!(&got[5..], &want[..]);
    }

    /// An h2 server on an in-memory pipe, with a small stream window, and
    /// the outbox attached to a call on it; returns the server's side of
    /// the call's request body, and what keeps the call open.
    async fn attached(window: u32) -> (Arc<Outbox>, h2::RecvStream, impl Sized) {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn =
                h2::server::Builder::new().initial_window_size(window).handshake::<_, Bytes>(server_io).await.unwrap();
            let (req, respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (req.into_body(), respond)
        });
        let (send, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let (resp, stream) = send.ready().await.unwrap().send_request(http::Request::new(()), false).unwrap();
        let o = Outbox::new();
        o.set_registered(4 << 20);
        o.attach(stream);
        tokio::spawn(write(o.clone()));
        let (body, respond) = server.await.unwrap();
        (o, body, (resp, respond))
    }

    /// Reads the request body to its end and decodes its batches.
    async fn received(mut body: h2::RecvStream) -> Vec<Vec<pb::Frame>> {
        let mut bytes = BytesMut::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
            bytes.extend_from_slice(&d);
        }
        let mut batches = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            let _ = bytes.split_to(5);
            let b: pb::ConnectRequest = prost::Message::decode(bytes.split_to(len)).unwrap();
            batches.push(b.frames);
        }
        batches
    }

    #[tokio::test]
    async fn a_polls_frames_leave_together_and_the_rest_through_the_writer() {
        let (o, body, _call) = attached(65_535).await;
        o.open(1);
        // Queued by a task under `Flushed`: one batch, at the end of its poll.
        let task = o.clone();
        Flushed::new(o.clone(), async move {
            task.message(1, Bytes::from_static(b"answer"));
            task.finish(1, frame::close(1, frame::status(Code::Ok, ""), vec![]));
        })
        .await;
        assert!(matches!(o.next_batch(), Next::Idle), "the task sent its frames itself, before yielding");
        // Queued elsewhere: the writer sends it.
        o.control(frame::window_update(3, 7)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        o.finish_all();
        let got = received(body).await;
        let got: Vec<_> = got.iter().map(|b| kinds(b)).collect();
        assert_eq!(got, vec![vec![(1, 12), (1, 15)], vec![(3, 16)]]);
    }

    #[tokio::test]
    async fn batches_wait_for_http2_capacity_and_arrive_whole() {
        // A 1 KiB HTTP/2 window against 3 MiB of messages on three streams.
        let (o, body, _call) = attached(1024).await;
        o.set_peer_window(MAX_SETTING);
        let sent: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![i; (1 << 20) + usize::from(i)])).collect();
        for (i, m) in sent.iter().enumerate() {
            let id = 2 * i as u64 + 1;
            o.open(id);
            o.message(id, m.clone());
            o.finish(id, frame::close(id, frame::status(Code::Ok, ""), vec![]));
        }
        o.finish_all();
        let mut got: HashMap<u64, BytesMut> = HashMap::new();
        let mut closed = 0;
        let batches = tokio::time::timeout(std::time::Duration::from_secs(20), received(body)).await;
        for f in batches.expect("everything arrives").into_iter().flatten() {
            match f.kind {
                Some(Kind::Message(m)) => got.entry(f.stream_id).or_default().extend_from_slice(&m.data),
                Some(Kind::Close(_)) => closed += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(closed, 3);
        for (i, m) in sent.iter().enumerate() {
            assert!(got[&(2 * i as u64 + 1)] == m[..], "stream {} differs", 2 * i + 1);
        }
    }

    #[test]
    fn control_queue_is_bounded() {
        let o = Outbox::new();
        for _ in 0..CONTROL_QUEUE_MAX {
            o.control(frame::window_update(1, 1)).unwrap();
        }
        let e = o.control(frame::window_update(1, 1)).unwrap_err();
        assert!(e.0.message.contains("control queue full"));
    }
}
