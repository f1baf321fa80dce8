//! The tunnel protocol (docs/tunnel-spec.md), plugin side: one `Connect`
//! call from `Hello` to close. This module is the only place that knows the
//! frames.
//!
//! Tasks of one tunnel:
//! - the **tunnel task** ([`run`]) reads batches and acts on every frame
//!   at once: it never waits for a handler (spec §3.4). It also runs the
//!   heartbeats and the drain;
//! - one **stream task** per call ([`dispatch::serve`]) runs the handler
//!   through tonic's routing. Its request body reads from a buffer the
//!   tunnel task fills, bounded by the stream's flow-control window;
//! - the **writer task** ([`writer::write`]) sends what the others queued
//!   when they could not: the tunnel task and the stream tasks hand their
//!   frames to HTTP/2 themselves, at the end of each poll.

pub(crate) mod defaults;
pub(crate) mod dispatch;
pub(crate) mod frame;
pub(crate) mod metadata;
pub(crate) mod settings;
pub(crate) mod stream;
pub(crate) mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::sleep_until;
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::proto::pluginframework::v1 as pb;
use defaults::*;
use dispatch::{Handler, Opened};
use frame::{RpcStatus, TunnelError, is_stream_kind, kind_name, status};
use pb::frame::Kind;
use settings::Limits;
use stream::{Phase, StreamEntry};
use writer::{Flushed, Outbox};

/// What every tunnel of a plugin registers and uses.
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) services: Vec<String>,
    pub(crate) labels: HashMap<String, String>,
    /// This side's receive limits and heartbeat preference.
    pub(crate) limits: Limits,
    pub(crate) heartbeat_max: Option<Duration>,
    pub(crate) drain_timeout: Duration,
}

/// What a tunnel tells its slot as it goes.
#[derive(Debug)]
pub(crate) enum Event {
    /// The operator's `Hello` arrived, with its `replica_count`.
    Hello {
        replica_count: u32,
    },
    Registered,
    /// The operator sent `GoAway` after registration: reconnect now.
    GoAway,
}

/// How a tunnel ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The plugin shut down.
    Shutdown,
    /// Anything else: the reason, for the logs.
    Closed(String),
}

/// The replica ids of the plugin's registered and registering tunnels
/// (spec §14.3).
#[derive(Default)]
pub(crate) struct Replicas(Mutex<HashMap<u64, String>>);

impl Replicas {
    /// Records the tunnel's replica; false when another tunnel holds it.
    fn claim(&self, tunnel: u64, replica: &str) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.iter().any(|(t, r)| *t != tunnel && r == replica) {
            return false;
        }
        m.insert(tunnel, replica.to_owned());
        true
    }

    fn release(&self, tunnel: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&tunnel);
    }
}

/// State shared by the tunnel task and the stream tasks.
pub(crate) struct Shared {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) handler: Arc<Handler>,
    streams: Mutex<HashMap<u64, Arc<StreamEntry>>>,
    /// Woken when a stream is removed (the drain waits for none).
    removed: Notify,
    peer_max_message: AtomicU32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<StreamEntry>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: u64) -> Option<Arc<StreamEntry>> {
        self.lock().get(&id).cloned()
    }

    fn active(&self) -> usize {
        self.lock().len()
    }

    /// Forgets a stream; true if it was there (its close is then owed by
    /// the caller of this).
    pub(crate) fn remove_stream(&self, id: u64) -> bool {
        let removed = self.lock().remove(&id).is_some();
        if removed {
            self.removed.notify_one();
        }
        removed
    }

    pub(crate) fn peer_max_message(&self) -> u32 {
        self.peer_max_message.load(Ordering::Relaxed)
    }
}

/// Why the tunnel task stops reading.
enum Stop {
    /// A tunnel error of ours: reported with `GoAway`, then close.
    Error(TunnelError),
    /// `GoAway` first (a duplicate), then close.
    GoAway(RpcStatus, String),
    /// Close at once.
    Close(String),
}

impl From<TunnelError> for Stop {
    fn from(e: TunnelError) -> Self {
        Self::Error(e)
    }
}

/// One attempt: dials nothing itself, runs the `Connect` call on `channel`.
pub(crate) struct Attempt {
    pub(crate) cfg: Arc<Config>,
    pub(crate) handler: Arc<Handler>,
    pub(crate) replicas: Arc<Replicas>,
    pub(crate) id: u64,
    pub(crate) events: mpsc::Sender<Event>,
    /// Until registered: when the attempt is abandoned (spec §4.5).
    pub(crate) handshake_deadline: Instant,
}

/// Runs one tunnel to its end.
pub(crate) async fn run(a: Attempt, h2: H2, token: Option<String>, shutdown: watch::Receiver<bool>) -> End {
    let outbox = Outbox::new();
    let hello = pb::Hello {
        min_version: VERSION,
        max_version: VERSION,
        settings: Some(a.cfg.limits.to_pb()),
        ..Default::default()
    };
    let _ = outbox.control(frame::frame(0, Kind::Hello(hello)));
    let shared = Arc::new(Shared {
        outbox: outbox.clone(),
        handler: a.handler.clone(),
        streams: Mutex::new(HashMap::new()),
        removed: Notify::new(),
        peer_max_message: AtomicU32::new(DEFAULT_MAX_MESSAGE_SIZE),
    });
    let mut conn = Conn {
        a,
        shared,
        hello: false,
        answered: false,
        registered: false,
        goaway_sent: false,
        goaway_received: false,
        highest: 0,
        peer: Limits::default(),
        heartbeat: None,
        ping_nonce: 0,
    };
    let end = Flushed::new(outbox.clone(), conn.main(h2, token, shutdown)).await;
    conn.close(&end);
    end
}

/// The HTTP/2 connection a tunnel runs on.
pub(crate) struct H2 {
    pub(crate) send: h2::client::SendRequest<bytes::Bytes>,
    /// `http` or `https`, and the authority the requests carry.
    pub(crate) scheme: &'static str,
    pub(crate) authority: String,
}

struct Conn {
    a: Attempt,
    shared: Arc<Shared>,
    hello: bool,
    answered: bool,
    registered: bool,
    goaway_sent: bool,
    goaway_received: bool,
    /// Highest stream id the operator has opened.
    highest: u64,
    peer: Limits,
    heartbeat: Option<Duration>,
    ping_nonce: u64,
}

impl Conn {
    async fn main(&mut self, h2: H2, token: Option<String>, mut shutdown: watch::Receiver<bool>) -> End {
        let handshake = tokio::time::Instant::from_std(self.a.handshake_deadline);
        let uri = format!("{}://{}{CONNECT_PATH}", h2.scheme, h2.authority);
        let Ok(uri) = http::Uri::try_from(uri) else {
            return End::Closed(format!("bad authority {:?}", h2.authority));
        };
        let mut req = http::Request::new(());
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        h.insert(http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT));
        if let Some(t) = token {
            match format!("Bearer {t}").parse() {
                Ok(v) => {
                    h.insert(http::header::AUTHORIZATION, v);
                }
                Err(_) => return End::Closed("the token is not a valid header value".into()),
            }
        }
        let max_batch = self.a.cfg.limits.max_batch_size as usize;
        let mut inbound = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return End::Shutdown,
            _ = sleep_until(handshake) => return End::Closed("no answer to Connect within the handshake timeout".into()),
            r = connect(h2.send, req, &self.shared.outbox, max_batch) => match r {
                Ok(r) => r,
                Err(s) => return End::Closed(format!("Connect failed: {:?} {}", s.code(), s.message())),
            },
        };

        let mut last_recv = tokio::time::Instant::now();
        let mut ping_at = last_recv;
        let mut check_at = last_recv;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut shutting_down = *shutdown.borrow();
        loop {
            if drain_deadline.is_some() && self.shared.active() == 0 {
                return self.flush_and_half_close(&mut inbound).await;
            }
            let interval = self.heartbeat;
            let drain_at = drain_deadline.unwrap_or(last_recv);
            let stop = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s), if !shutting_down => {
                    shutting_down = true;
                    if !self.registered {
                        return End::Shutdown;
                    }
                    tracing::info!(tunnel = self.a.id, "draining: GoAway sent, waiting for calls in flight");
                    self.send_goaway(status(Code::Unavailable, "plugin shutting down"));
                    drain_deadline = Some(tokio::time::Instant::now() + self.a.cfg.drain_timeout);
                    continue;
                }
                _ = sleep_until(drain_at), if drain_deadline.is_some() => {
                    tracing::warn!(tunnel = self.a.id, active = self.shared.active(), "drain timeout: closing with calls in flight");
                    return End::Shutdown;
                }
                _ = self.shared.removed.notified(), if drain_deadline.is_some() => continue,
                _ = sleep_until(handshake), if !self.registered => {
                    Stop::Close("no registration answer within the handshake timeout".into())
                }
                _ = sleep_until(ping_at), if interval.is_some() => {
                    self.ping_nonce += 1;
                    ping_at += interval.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
                    match self.shared.outbox.control(frame::frame(0, Kind::Ping(pb::Ping { nonce: self.ping_nonce }))) {
                        Ok(()) => continue,
                        Err(e) => Stop::Error(e),
                    }
                }
                _ = sleep_until(check_at), if interval.is_some() => {
                    let i = interval.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
                    check_at += i / 4;
                    let silent = last_recv.elapsed();
                    if silent <= i * 3 / 2 {
                        continue;
                    }
                    Stop::Close(format!(
                        "heartbeat timeout: nothing received from the peer for {}ms",
                        silent.as_millis()
                    ))
                }
                m = inbound.next() => match m {
                    Some(Ok(batch)) => {
                        last_recv = tokio::time::Instant::now();
                        let had_hello = self.hello;
                        match self.on_batch(batch) {
                            Ok(()) => {
                                if !had_hello && self.hello {
                                    ping_at = last_recv + self.heartbeat.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
                                    check_at = last_recv + self.heartbeat.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL) / 4;
                                }
                                continue;
                            }
                            Err(stop) => stop,
                        }
                    }
                    None => Stop::Close("peer closed the tunnel".into()),
                    Some(Err(s)) => Stop::Close(format!("Connect ended: {:?} {}", s.code(), s.message())),
                },
            };
            return match stop {
                Stop::Close(reason) => End::Closed(reason),
                Stop::Error(e) => {
                    tracing::warn!(tunnel = self.a.id, code = ?frame::code_of(&e.0), "tunnel error: {}", e.0.message);
                    let reason = format!("tunnel error: {}", e.0.message);
                    self.send_goaway(e.0);
                    self.flush_and_half_close(&mut inbound).await;
                    End::Closed(reason)
                }
                Stop::GoAway(st, reason) => {
                    self.send_goaway(st);
                    self.flush_and_half_close(&mut inbound).await;
                    End::Closed(reason)
                }
            };
        }
    }

    fn send_goaway(&mut self, st: RpcStatus) {
        self.goaway_sent = true;
        self.a.replicas.release(self.a.id);
        // A GoAway leaves even when the control queue is full.
        self.shared.outbox.urgent(frame::go_away(st, self.highest));
    }

    /// Sends what is queued, within `wait`.
    async fn flush(&mut self, wait: Duration) {
        self.shared.outbox.finish_all();
        let _ = tokio::time::timeout(wait, self.shared.outbox.ended()).await;
    }

    /// The end of a drain: everything queued leaves, the sending side of
    /// the call is closed, and the operator gets a second to end it.
    async fn flush_and_half_close(&mut self, inbound: &mut tonic::Streaming<pb::ConnectResponse>) -> End {
        self.flush(ERROR_FLUSH_WAIT).await;
        let _ = tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = inbound.next().await {} }).await;
        End::Shutdown
    }

    /// Closes the tunnel: nothing more is sent, every stream still open
    /// ends without a frame.
    fn close(&mut self, end: &End) {
        self.shared.outbox.close();
        self.a.replicas.release(self.a.id);
        let reason = match end {
            End::Shutdown => "plugin tunnel closed: plugin shutting down".to_owned(),
            End::Closed(r) => format!("plugin tunnel closed: {r}"),
        };
        let streams: Vec<_> = self.shared.lock().drain().map(|(_, e)| e).collect();
        for e in streams {
            e.stop(status(Code::Unavailable, reason.clone()));
        }
    }

    fn on_batch(&mut self, batch: pb::ConnectResponse) -> Result<(), Stop> {
        if batch.frames.len() > MAX_FRAMES_PER_BATCH {
            return Err(TunnelError::new(Code::ResourceExhausted, "batch of more than 4096 frames").into());
        }
        // A chunk's data is a view of the batch's buffer, which it keeps
        // alive. Chunks under half the batch are copied, so that what a
        // stream holds stays within twice its cost (spec §8.2).
        let copy_below = prost::Message::encoded_len(&batch) / 2;
        for mut f in batch.frames {
            if let Some(Kind::Message(m)) = &mut f.kind
                && m.data.len() < copy_below
            {
                m.data = bytes::Bytes::copy_from_slice(&m.data);
            }
            self.on_frame(f)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, f: pb::Frame) -> Result<(), Stop> {
        // A kind from a later version decodes as no kind: ignored (§15).
        let Some(kind) = f.kind else { return Ok(()) };
        let id = f.stream_id;
        let k = kind_name(&kind);
        if id == 0 {
            if is_stream_kind(&kind) {
                return Err(TunnelError::new(Code::Internal, format!("stream frame {k} on stream 0")).into());
            }
            return self.on_tunnel_frame(kind);
        }
        if !is_stream_kind(&kind) {
            return Err(TunnelError::new(Code::Internal, format!("tunnel frame {k} on stream {id}")).into());
        }
        if !self.registered {
            return Err(TunnelError::new(Code::Internal, format!("stream frame {k} before registration")).into());
        }
        match kind {
            Kind::Open(o) => self.on_open(id, o),
            other => self.on_stream_frame(id, other),
        }
    }

    fn on_tunnel_frame(&mut self, kind: Kind) -> Result<(), Stop> {
        let out = &self.shared.outbox;
        match kind {
            Kind::Hello(h) => {
                if self.hello {
                    return Err(TunnelError::new(Code::Internal, "second hello").into());
                }
                self.hello = true;
                settings::negotiate(h.min_version, h.max_version)?;
                let peer = Limits::from_peer(h.settings.as_ref())?;
                if h.replica_id.len() > MAX_REPLICA_ID {
                    return Err(
                        TunnelError::new(Code::InvalidArgument, "bad hello: replica id longer than 253 bytes").into()
                    );
                }
                self.peer = peer;
                out.set_peer_window(peer.initial_window_size);
                self.shared.peer_max_message.store(peer.max_message_size, Ordering::Relaxed);
                let cfg = &self.a.cfg;
                self.heartbeat =
                    Some(settings::heartbeat_interval(cfg.limits.heartbeat, peer.heartbeat, cfg.heartbeat_max));
                let _ = self.a.events.try_send(Event::Hello { replica_count: h.replica_count });
                if !h.replica_id.is_empty() && !self.a.replicas.claim(self.a.id, &h.replica_id) {
                    let msg = format!("duplicate tunnel to replica {}", h.replica_id);
                    return Err(Stop::GoAway(status(Code::Unavailable, msg.clone()), msg));
                }
                tracing::debug!(tunnel = self.a.id, replica = %h.replica_id, "operator hello; registering");
                let reg = pb::Register {
                    name: cfg.name.clone(),
                    version: cfg.version.clone(),
                    services: cfg.services.clone(),
                    labels: cfg.labels.clone(),
                };
                out.control(frame::frame(0, Kind::Register(reg)))?;
            }
            Kind::Register(_) => return Err(TunnelError::new(Code::Internal, "register sent to a plugin").into()),
            Kind::RegisterAck(ack) => {
                if !self.hello || self.answered {
                    return Err(TunnelError::new(Code::Internal, "registration answer out of order").into());
                }
                self.answered = true;
                self.registered = true;
                out.set_registered(self.peer.max_batch_size);
                tracing::info!(tunnel = self.a.id, instance = %ack.instance_id, "registered");
                let _ = self.a.events.try_send(Event::Registered);
            }
            Kind::RegisterReject(r) => {
                if !self.hello || self.answered {
                    return Err(TunnelError::new(Code::Internal, "registration answer out of order").into());
                }
                self.answered = true;
                let st = r.status.unwrap_or_else(|| status(Code::PermissionDenied, ""));
                return Err(Stop::Close(format!("registration refused: {:?} {}", frame::code_of(&st), st.message)));
            }
            Kind::Ping(p) => out.pong(p.nonce),
            Kind::Pong(_) => {}
            Kind::GoAway(g) => {
                let st = g.reason.unwrap_or_else(|| status(Code::Unavailable, ""));
                let code = frame::code_of(&st);
                if !self.registered {
                    return Err(Stop::Close(format!("GoAway before registration: {code:?} {}", st.message)));
                }
                if !self.goaway_received {
                    self.goaway_received = true;
                    self.a.replicas.release(self.a.id);
                    tracing::info!(tunnel = self.a.id, ?code, reason = %st.message, "operator sent GoAway: reconnecting");
                    let _ = self.a.events.try_send(Event::GoAway);
                }
                if !matches!(code, Code::Ok | Code::Unavailable) {
                    return Err(Stop::Close(format!("peer reported a tunnel error: {code:?} {}", st.message)));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// `StreamOpen` (spec §6.2).
    fn on_open(&mut self, id: u64, o: pb::StreamOpen) -> Result<(), Stop> {
        let out = self.shared.outbox.clone();
        if id.is_multiple_of(2) {
            return Err(
                TunnelError::new(Code::Internal, format!("peer opened stream {id} with this side's parity")).into()
            );
        }
        if id <= self.highest {
            let st = status(Code::Internal, format!("stream id {id} reused"));
            match self.shared.get(id) {
                Some(e) if e.phase() == Phase::Cancelling => {}
                Some(e) => self.abort(&e, st),
                None => out.control(frame::close(id, st, Vec::new()))?,
            }
            return Ok(());
        }
        self.highest = id;
        let refuse = |code, msg: String| out.control(frame::close(id, status(code, msg), Vec::new()));
        if self.goaway_sent {
            return Ok(refuse(Code::Unavailable, "tunnel is draining".into())?);
        }
        let max = self.a.cfg.limits.max_concurrent_streams;
        if self.shared.active() >= max as usize {
            return Ok(refuse(Code::ResourceExhausted, format!("more than {max} concurrent streams"))?);
        }
        if !well_formed(&o.method) {
            return Ok(refuse(Code::Internal, format!("malformed method name {:?}", o.method))?);
        }
        let md = match metadata::check(o.metadata) {
            Ok(md) => md,
            Err(d) => return Ok(refuse(Code::Internal, format!("malformed metadata: {d}"))?),
        };
        let timeout = match o.timeout.as_ref().map(frame::duration) {
            None => None,
            Some(Some(Ok(d))) if !d.is_zero() => Some(d),
            Some(_) => return Ok(refuse(Code::Internal, "malformed timeout".into())?),
        };
        let entry = StreamEntry::new(
            id,
            self.a.cfg.limits.initial_window_size,
            self.a.cfg.limits.max_message_size,
            out.clone(),
        );
        self.shared.lock().insert(id, entry.clone());
        let space = out.open(id);
        let opened = Opened { method: o.method, metadata: md, timeout, received: Instant::now() };
        tokio::spawn(Flushed::new(out.clone(), dispatch::serve(self.shared.clone(), entry, space, opened)));
        Ok(())
    }

    /// Any other stream frame (spec §6.3–§6.5).
    fn on_stream_frame(&mut self, id: u64, kind: Kind) -> Result<(), Stop> {
        let Some(e) = self.shared.get(id) else {
            // A stream whose handler is done may still be sending what it
            // queued before its close: credit and cancels still apply.
            match &kind {
                Kind::WindowUpdate(w) if w.increment > 0 => {
                    let _ = self.shared.outbox.add_credit(id, w.increment);
                }
                Kind::Cancel(_) => self.shared.outbox.drop_data(id),
                _ => {}
            }
            if matches!(kind, Kind::Cancel(_) | Kind::Close(_)) {
                return Ok(());
            }
            // Known: an operator id already opened (the plugin opens none).
            if !id.is_multiple_of(2) && id <= self.highest {
                return Ok(());
            }
            let st = status(Code::Internal, format!("frame for unknown stream {id}"));
            let f = if id.is_multiple_of(2) { frame::cancel(id, st) } else { frame::close(id, st, Vec::new()) };
            return Ok(self.shared.outbox.control(f)?);
        };
        let cancelling = e.phase() == Phase::Cancelling;
        let violation = match kind {
            Kind::Message(m) => e.on_message(m).err(),
            Kind::HalfClose(_) => e.on_half_close().err(),
            Kind::Cancel(c) => {
                e.on_cancel(c.status);
                None
            }
            Kind::WindowUpdate(w) if w.increment == 0 => {
                (!cancelling).then(|| status(Code::Internal, "window update of zero"))
            }
            Kind::WindowUpdate(w) => match self.shared.outbox.add_credit(id, w.increment) {
                Err(()) if !cancelling => Some(status(Code::Internal, "window update overflows the window")),
                _ => None,
            },
            Kind::Headers(h) if !cancelling => Some(match metadata::check(h.metadata) {
                Err(d) => status(Code::Internal, format!("malformed headers: {d}")),
                Ok(_) => status(Code::Internal, "headers sent by the caller"),
            }),
            Kind::Close(_) if !cancelling => Some(status(Code::Internal, "close sent by the caller")),
            _ => None,
        };
        if let Some(v) = violation {
            self.abort(&e, v);
        }
        Ok(())
    }

    /// Aborts a handler stream (spec §6.6).
    fn abort(&self, e: &Arc<StreamEntry>, st: RpcStatus) {
        if self.shared.remove_stream(e.id) {
            tracing::debug!(stream = e.id, "stream aborted: {}", st.message);
            self.shared.outbox.abort(e.id, frame::close(e.id, st.clone(), Vec::new()));
            e.stop(st);
        }
    }
}

/// The `Connect` method.
const CONNECT_PATH: &str = "/pluginframework.v1.PluginFrameworkService/Connect";

/// Sent with `Connect`, as gRPC clients do.
const USER_AGENT: &str = concat!("opf-rust/", env!("CARGO_PKG_VERSION"));

/// Starts the `Connect` call, hands its sending half to the outbox (and
/// starts the writer task, which ends with it), and returns the stream of
/// batches.
async fn connect(
    send: h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
    outbox: &Arc<Outbox>,
    max_batch: usize,
) -> Result<tonic::Streaming<pb::ConnectResponse>, tonic::Status> {
    use tonic::codec::Codec as _;
    let h2_status = |e: h2::Error| tonic::Status::from_error(Box::new(e));
    let mut send = send.ready().await.map_err(h2_status)?;
    let (resp, stream) = send.send_request(req, false).map_err(h2_status)?;
    outbox.attach(stream);
    tokio::spawn(writer::write(outbox.clone()));
    let resp = resp.await.map_err(h2_status)?;
    let status_code = resp.status();
    // A trailers-only answer: the status is in the headers.
    let trailers_only = tonic::Status::from_header_map(resp.headers());
    if let Some(s) = &trailers_only
        && s.code() != Code::Ok
    {
        return Err(s.clone());
    }
    let decoder = tonic_prost::ProstCodec::<pb::ConnectRequest, pb::ConnectResponse>::default().decoder();
    let body = Inbound { recv: resp.into_body(), data_done: false };
    Ok(match trailers_only {
        Some(_) => tonic::Streaming::new_empty(decoder, body),
        None => tonic::Streaming::new_response(decoder, body, status_code, None, Some(max_batch)),
    })
}

/// The `Connect` call's response as a body tonic decodes; what it yields
/// is given back to HTTP/2 flow control at once (the tunnel's own flow
/// control bounds what is buffered).
struct Inbound {
    recv: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for Inbound {
    type Data = bytes::Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, h2::Error>>> {
        use std::task::{Poll, ready};
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(ready!(this.recv.poll_trailers(cx)).transpose().map(|r| r.map(http_body::Frame::trailers)))
    }
}

/// `/service/method`, at least 4 bytes, last `/` neither at 1 nor last.
fn well_formed(m: &str) -> bool {
    let Some(slash) = m.rfind('/') else { return false };
    m.len() >= 4 && m.starts_with('/') && slash != 1 && slash != m.len() - 1 && slash != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names() {
        for m in ["/a/b", "/acme.v1.Svc/Do", "/a/b/c"] {
            assert!(well_formed(m), "{m}");
        }
        for m in ["", "/a/", "//b", "a/bc", "/ab", "/abc"] {
            assert!(!well_formed(m), "{m}");
        }
    }

    #[test]
    fn replicas_are_claimed_once() {
        let r = Replicas::default();
        assert!(r.claim(1, "a"));
        assert!(r.claim(1, "a"));
        assert!(!r.claim(2, "a"));
        assert!(r.claim(2, "b"));
        r.release(1);
        assert!(r.claim(3, "a"));
    }
}
