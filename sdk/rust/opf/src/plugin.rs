//! The public plugin: its builder, and the slots that keep one registered
//! tunnel per operator address or replica (spec §14.2).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tower::{Layer, Service};

use crate::Error;
use crate::backoff::Backoff;
use crate::credentials::{self, SERVICE_ACCOUNT_TOKEN_PATH, Tls, TokenSource};
use crate::dial::{Dialled, dial};
use crate::target::{Addr, Target};
use crate::tunnel::dispatch::{Handler, Svc};
use crate::tunnel::settings::Limits;
use crate::tunnel::{self, Attempt, Config, End, Event, Replicas};

/// How often the target is resolved again (the Go default).
const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a closed tunnel's connection gets to close cleanly.
const CONNECTION_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Most slots, whatever the addresses and replicas (spec §14.2).
const MAX_SLOTS: usize = 64;

/// A plugin: gRPC services served to an operator through the tunnel.
///
/// Build one with [`Plugin::builder`], add tonic-generated servers with
/// [`PluginBuilder::add_service`], and run it with
/// [`PluginBuilder::serve_with_shutdown`].
pub struct Plugin {
    inner: Arc<Inner>,
}

type LayerFn = Box<dyn FnOnce(Svc) -> Svc + Send>;

/// Configures a [`Plugin`]. Every option has the Go client's default.
pub struct PluginBuilder {
    name: String,
    version: String,
    routes: Option<Routes>,
    services: Vec<String>,
    layers: Vec<LayerFn>,
    labels: HashMap<String, String>,
    limits: Limits,
    heartbeat_max: Option<Duration>,
    drain_timeout: Duration,
    handshake_timeout: Duration,
    backoff: Backoff,
    tls: Option<Tls>,
    token: Option<TokenSource>,
    plaintext_token: bool,
}

impl Plugin {
    /// Starts configuring a plugin that registers under `name` (the name
    /// the operator calls it by) with its own free-form `version`.
    pub fn builder(name: impl Into<String>, version: impl Into<String>) -> PluginBuilder {
        PluginBuilder {
            name: name.into(),
            version: version.into(),
            routes: None,
            services: Vec::new(),
            layers: Vec::new(),
            labels: HashMap::new(),
            limits: Limits::default(),
            heartbeat_max: None,
            drain_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            tls: None,
            token: None,
            plaintext_token: false,
        }
    }

    /// Serves until `signal` completes, then drains: a `GoAway` on every
    /// tunnel, calls in flight get the drain timeout to finish, then the
    /// tunnels close. Connection failures are logged and retried with
    /// backoff; they never end this.
    pub async fn serve_with_shutdown<F: Future<Output = ()>>(self, signal: F) -> Result<(), Error> {
        let inner = self.inner;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut slots = JoinSet::new();
        let mut failures = 0;
        let mut next_resolve = tokio::time::Instant::now();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                biased;
                _ = &mut signal => break,
                _ = tokio::time::sleep_until(next_resolve) => inner.resolve(&mut failures, &mut next_resolve).await,
                _ = inner.resolve_now.notified() => inner.resolve(&mut failures, &mut next_resolve).await,
                _ = inner.recount.notified() => {}
                Some(_) = slots.join_next(), if !slots.is_empty() => {}
            }
            if inner.addrs.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                continue;
            }
            let want = inner.slot_count();
            let mut alive = inner.alive.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..want {
                if alive.insert(i) {
                    slots.spawn(slot(inner.clone(), i, stop_rx.clone()));
                }
            }
        }
        tracing::info!(plugin = %inner.cfg.name, "shutting down: draining tunnels");
        let _ = stop_tx.send(true);
        while slots.join_next().await.is_some() {}
        Ok(())
    }
}

impl PluginBuilder {
    /// Serves a tonic-generated server (`XServer::new(impl)`, possibly
    /// `XServer::with_interceptor`), routed by its
    /// [`NamedService::NAME`] as tonic routes it. Call it once per service;
    /// every service added is listed in the registration.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: Service<http::Request<Body>, Error = Infallible> + NamedService + Clone + Send + Sync + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.services.push(S::NAME.to_owned());
        self.routes = Some(match self.routes.take() {
            None => Routes::new(svc),
            Some(r) => r.add_service(svc),
        });
        self
    }

    /// Wraps every call in a tower layer, as `tonic::transport::Server::layer`
    /// does. Layers added first are outermost. Errors of the layered
    /// service end the call with the status `tonic::Status::from_error`
    /// gives them.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Svc> + Send + 'static,
        L::Service: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
        <L::Service as Service<http::Request<Body>>>::Future: Send + 'static,
        <L::Service as Service<http::Request<Body>>>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.layers
            .push(Box::new(move |inner: Svc| Svc::new(StatusOnError { inner: layer.layer(inner), ready_error: None })));
        self
    }

    /// Adds a label to the registration (for example the pod name). None
    /// by default.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds labels to the registration.
    pub fn labels<K: Into<String>, V: Into<String>>(mut self, labels: impl IntoIterator<Item = (K, V)>) -> Self {
        self.labels.extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Largest request message the operator may send, in bytes.
    /// Default 4 MiB. (A tonic server also has its own
    /// `max_decoding_message_size`, 4 MiB by default: raise both.)
    pub fn max_message_size(mut self, bytes: u32) -> Self {
        self.limits.max_message_size = bytes;
        self
    }

    /// Flow-control window of each call for data from the operator, in
    /// bytes (at least 1,024). Default 2 MiB.
    pub fn initial_window_size(mut self, bytes: u32) -> Self {
        self.limits.initial_window_size = bytes;
        self
    }

    /// How many calls the operator may have open at once on one tunnel.
    /// Default 100.
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.limits.max_concurrent_streams = n;
        self
    }

    /// Asks for heartbeats no more often than this; the operator's interval
    /// applies when it is longer. Default: no preference (10 s, or the
    /// operator's).
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.limits.heartbeat = Some(d);
        self
    }

    /// Caps the heartbeat interval this side uses, whatever the operator
    /// asks, so that a dead operator is always detected within twice this.
    /// Default: no maximum.
    pub fn max_heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_max = Some(d);
        self
    }

    /// How long shutdown waits for calls in flight. Default 10 s.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Bounds each connection attempt, from dialling to the operator's
    /// answer to the registration. Default 10 s.
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = d;
        self
    }

    /// Reconnection backoff. Default: 250 ms base, factor 1.6, jitter 0.2,
    /// at most 30 s; reset after each registration.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Connects over TLS. Default: plaintext, fit only for a unix socket.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticates with the bearer token in this file (surrounding white
    /// space ignored), read again at every (re)connection so that a rotated
    /// token is used from the next tunnel on. Sent as
    /// `authorization: Bearer TOKEN`, only over TLS unless
    /// [`plaintext_token`](Self::plaintext_token) allows otherwise.
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token = Some(TokenSource::File(path.into()));
        self
    }

    /// Authenticates with the pod's ServiceAccount token, read from
    /// [`SERVICE_ACCOUNT_TOKEN_PATH`](crate::SERVICE_ACCOUNT_TOKEN_PATH) at
    /// every (re)connection. Mount a projected token with the operator's
    /// audience there, or use [`token_file`](Self::token_file).
    pub fn service_account_token(self) -> Self {
        self.token_file(SERVICE_ACCOUNT_TOKEN_PATH)
    }

    /// Authenticates with a fixed bearer token, for tests and tools.
    pub fn static_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(TokenSource::Static(token.into()));
        self
    }

    /// Allows the token to be sent without TLS, and then only to a unix
    /// socket or a loopback address: building fails for any other target.
    /// Default: a token needs TLS.
    pub fn plaintext_token(mut self) -> Self {
        self.plaintext_token = true;
        self
    }

    /// Checks the configuration and the target (spec §14.1) and builds the
    /// plugin; nothing is dialled yet.
    pub fn build(self, target: &str) -> Result<Plugin, Error> {
        let parsed = Target::parse(target)?;
        check_registration(&self.name, &self.version, &self.services, &self.labels)?;
        check_limits(&self.limits, self.heartbeat_max)?;
        self.backoff.validate().map_err(Error::InvalidOption)?;
        credentials::check(&parsed, target, self.tls.as_ref(), self.token.as_ref(), self.plaintext_token)?;
        let routes = self.routes.ok_or_else(|| Error::InvalidRegistration("no service listed".into()))?;
        let mut svc = Svc::new(routes.prepare());
        for layer in self.layers.into_iter().rev() {
            svc = layer(svc);
        }
        let services = self.services.iter().cloned().collect::<HashSet<_>>();
        let inner = Inner {
            cfg: Arc::new(Config {
                name: self.name,
                version: self.version,
                services: self.services,
                labels: self.labels,
                limits: self.limits,
                heartbeat_max: self.heartbeat_max,
                drain_timeout: self.drain_timeout,
            }),
            handler: Arc::new(Handler { svc, services }),
            replicas: Arc::new(Replicas::default()),
            target: parsed,
            tls: self.tls,
            token: self.token,
            backoff: self.backoff,
            handshake_timeout: self.handshake_timeout,
            addrs: Mutex::new(Vec::new()),
            replica_counts: Mutex::new(HashMap::new()),
            alive: Mutex::new(HashSet::new()),
            next_tunnel: AtomicU64::new(1),
            resolve_now: Notify::new(),
            recount: Notify::new(),
        };
        Ok(Plugin { inner: Arc::new(inner) })
    }

    /// Builds the plugin for `target` and serves it until `signal`
    /// completes ([`Plugin::serve_with_shutdown`]).
    ///
    /// `target` is the operator's address: `unix:///ABSOLUTE/PATH`,
    /// `unix:/ABSOLUTE/PATH`, `dns:///HOST:PORT`, `HOST:PORT`,
    /// `tcp://HOST:PORT`, `ipv4:ADDR:PORT[,ADDR:PORT]...` or
    /// `ipv6:[ADDR]:PORT[,[ADDR]:PORT]...`.
    pub async fn serve_with_shutdown<F: Future<Output = ()>>(self, target: &str, signal: F) -> Result<(), Error> {
        self.build(target)?.serve_with_shutdown(signal).await
    }

    /// [`serve_with_shutdown`](Self::serve_with_shutdown) until SIGTERM or
    /// Ctrl-C ([`shutdown_signal`](crate::shutdown_signal)).
    pub async fn serve(self, target: &str) -> Result<(), Error> {
        self.serve_with_shutdown(target, crate::shutdown_signal()).await
    }
}

/// Turns a layered service's errors into a status response, so that every
/// call ends with a `StreamClose`.
#[derive(Clone)]
struct StatusOnError<S> {
    inner: S,
    /// A `poll_ready` error, answered on the next call.
    ready_error: Option<tonic::Status>,
}

impl<S> Service<http::Request<Body>> for StatusOnError<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        use std::task::Poll;
        if self.ready_error.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.ready_error = Some(tonic::Status::from_error(e.into()));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if let Some(st) = self.ready_error.take() {
            return Box::pin(std::future::ready(Ok(st.into_http())));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            Ok(match fut.await {
                Ok(resp) => resp,
                Err(e) => tonic::Status::from_error(e.into()).into_http(),
            })
        })
    }
}

/// The registration rules the operator checks (spec §4.4), checked here so
/// that a plugin that breaks them never starts.
fn check_registration(
    name: &str,
    version: &str,
    services: &[String],
    labels: &HashMap<String, String>,
) -> Result<(), Error> {
    let bad = |m: String| Err(Error::InvalidRegistration(m));
    let cut = |s: &str| {
        let mut end = s.len().min(64);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    };
    if name.is_empty() {
        return bad("plugin name is empty".into());
    }
    if name.len() > 253 {
        return bad("plugin name is longer than 253 characters".into());
    }
    if version.len() > 128 {
        return bad("plugin version is longer than 128 bytes".into());
    }
    if services.is_empty() {
        return bad("no service listed".into());
    }
    if services.len() > 64 {
        return bad("more than 64 services".into());
    }
    for s in services {
        if s.is_empty() || s.len() > 253 || s.contains('/') || s.contains(' ') {
            return bad(format!("invalid service name {:?}", cut(s)));
        }
    }
    if labels.len() > 32 {
        return bad("more than 32 labels".into());
    }
    let mut keys: Vec<_> = labels.keys().collect();
    keys.sort();
    for k in keys {
        if k.is_empty() || k.len() > 128 || labels[k].len() > 256 {
            return bad(format!("invalid label {:?}", cut(k)));
        }
    }
    Ok(())
}

fn check_limits(l: &Limits, heartbeat_max: Option<Duration>) -> Result<(), Error> {
    use crate::tunnel::defaults::*;
    let bad = |m: &str| Err(Error::InvalidOption(m.into()));
    if l.max_message_size == 0 || l.max_message_size > MAX_SETTING {
        return bad("max_message_size must be from 1 to 2^31-1");
    }
    if !(MIN_INITIAL_WINDOW_SIZE..=MAX_SETTING).contains(&l.initial_window_size) {
        return bad("initial_window_size must be from 1024 to 2^31-1");
    }
    if l.max_concurrent_streams == 0 || l.max_concurrent_streams > MAX_SETTING {
        return bad("max_concurrent_streams must be from 1 to 2^31-1");
    }
    if l.heartbeat.is_some_and(|h| h.is_zero()) || heartbeat_max.is_some_and(|h| h < MIN_HEARTBEAT_INTERVAL) {
        return bad("heartbeat intervals must be above zero (a maximum at least 100 ms)");
    }
    Ok(())
}

struct Inner {
    cfg: Arc<Config>,
    handler: Arc<Handler>,
    replicas: Arc<Replicas>,
    target: Target,
    tls: Option<Tls>,
    token: Option<TokenSource>,
    backoff: Backoff,
    handshake_timeout: Duration,
    /// The target's addresses, as last resolved.
    addrs: Mutex<Vec<Addr>>,
    /// `replica_count` from the operator `Hello` of each tunnel held.
    replica_counts: Mutex<HashMap<u64, u32>>,
    /// Slot indexes running.
    alive: Mutex<HashSet<usize>>,
    next_tunnel: AtomicU64,
    /// Resolve again (a tunnel was lost).
    resolve_now: Notify,
    /// The slot count may have changed.
    recount: Notify,
}

impl Inner {
    async fn resolve(&self, failures: &mut u32, next: &mut tokio::time::Instant) {
        match self.target.resolve().await {
            Ok(a) => {
                *self.addrs.lock().unwrap_or_else(|e| e.into_inner()) = a;
                *failures = 0;
                *next = tokio::time::Instant::now() + RESOLVE_INTERVAL;
            }
            Err(e) => {
                let d = self.backoff.delay(*failures);
                *failures += 1;
                tracing::warn!("resolving the target failed, retrying in {d:?}: {e}");
                *next = tokio::time::Instant::now() + d;
            }
        }
    }

    /// `S = max(A, R, 1)`, at most 64.
    fn slot_count(&self) -> usize {
        let a = self.addrs.lock().unwrap_or_else(|e| e.into_inner()).len();
        let r = self.replica_counts.lock().unwrap_or_else(|e| e.into_inner()).values().copied().max().unwrap_or(0);
        a.max(r as usize).clamp(1, MAX_SLOTS)
    }

    fn set_replica_count(&self, tunnel: u64, n: Option<u32>) {
        let mut m = self.replica_counts.lock().unwrap_or_else(|e| e.into_inner());
        match n {
            Some(n) => m.insert(tunnel, n),
            None => m.remove(&tunnel),
        };
    }
}

/// One slot: keeps one registered tunnel to its address, reconnecting with
/// backoff, at once after a `GoAway`. Old tunnels keep serving their calls
/// until they end.
async fn slot(inner: Arc<Inner>, index: usize, mut stop: watch::Receiver<bool>) {
    let mut n = 0u32;
    let mut tunnels = JoinSet::new();
    loop {
        if *stop.borrow() || index >= inner.slot_count() {
            break;
        }
        let addr = {
            let addrs = inner.addrs.lock().unwrap_or_else(|e| e.into_inner());
            addrs[index % addrs.len()].clone()
        };
        let id = inner.next_tunnel.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(4);
        tunnels.spawn(attempt(inner.clone(), id, addr, tx, stop.clone()));
        let mut reconnect_now = false;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Hello { replica_count }) => {
                        inner.set_replica_count(id, Some(replica_count));
                        inner.recount.notify_one();
                    }
                    Some(Event::Registered) => n = 0,
                    Some(Event::GoAway) => {
                        reconnect_now = true;
                        break;
                    }
                    None => break,
                },
                // Reap tunnels that ended after a GoAway.
                Some(_) = tunnels.join_next(), if tunnels.len() > 1 => {}
            }
        }
        if reconnect_now {
            continue;
        }
        inner.set_replica_count(id, None);
        if *stop.borrow() {
            break;
        }
        inner.resolve_now.notify_one();
        let delay = inner.backoff.delay(n);
        n = n.saturating_add(1);
        tracing::info!(slot = index, "reconnecting in {delay:?}");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Tunnels drain on their own once `stop` is set.
    while tunnels.join_next().await.is_some() {}
    inner.alive.lock().unwrap_or_else(|e| e.into_inner()).remove(&index);
    inner.recount.notify_one();
}

/// Dials `addr`, then runs the tunnel to its end.
async fn attempt(inner: Arc<Inner>, id: u64, addr: Addr, events: mpsc::Sender<Event>, mut stop: watch::Receiver<bool>) {
    let deadline = Instant::now() + inner.handshake_timeout;
    let dialled = tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        r = tokio::time::timeout_at(deadline.into(), dial(&inner.target, inner.tls.as_ref(), &addr)) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(tunnel = id, "connecting failed: {e}");
                return;
            }
            Err(_) => {
                tracing::warn!(tunnel = id, "connecting to {addr:?} took longer than the handshake timeout");
                return;
            }
        },
    };
    let token = match inner.token.as_ref().map(TokenSource::read).transpose() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(tunnel = id, "{e}");
            return;
        }
    };
    let a = Attempt {
        cfg: inner.cfg.clone(),
        handler: inner.handler.clone(),
        replicas: inner.replicas.clone(),
        id,
        events,
        handshake_deadline: deadline,
    };
    let Dialled { h2, mut task } = dialled;
    match tunnel::run(a, h2, token, stop).await {
        End::Shutdown => tracing::debug!(tunnel = id, "tunnel closed: plugin shutting down"),
        End::Closed(reason) => tracing::warn!(tunnel = id, "tunnel closed: {reason}"),
    }
    inner.set_replica_count(id, None);
    // Nothing uses the connection any more: it closes, within a bound
    // should the operator stop reading.
    if tokio::time::timeout(CONNECTION_CLOSE_WAIT, &mut task).await.is_err() {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> HashMap<String, String> {
        (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect()
    }

    #[test]
    fn registration_rules() {
        let svc = vec!["a.v1.S".to_owned()];
        let ok = |n: &str, v: &str, s: &[String], l: &HashMap<String, String>| check_registration(n, v, s, l);
        assert!(ok("p", "v1", &svc, &labels(32)).is_ok());
        let msg = |r: Result<(), Error>| r.unwrap_err().to_string();
        assert!(msg(ok("", "", &svc, &labels(0))).contains("plugin name is empty"));
        assert!(msg(ok(&"n".repeat(254), "", &svc, &labels(0))).contains("longer than 253"));
        assert!(msg(ok("p", &"v".repeat(129), &svc, &labels(0))).contains("longer than 128"));
        assert!(msg(ok("p", "", &[], &labels(0))).contains("no service listed"));
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(msg(ok("p", "", &many, &labels(0))).contains("more than 64 services"));
        assert!(msg(ok("p", "", &["a/b".to_owned()], &labels(0))).contains("invalid service name \"a/b\""));
        assert!(msg(ok("p", "", &svc, &labels(33))).contains("more than 32 labels"));
        let mut l = labels(0);
        l.insert("k".into(), "v".repeat(257));
        assert!(msg(ok("p", "", &svc, &l)).contains("invalid label \"k\""));
        let mut l = labels(0);
        l.insert("x".repeat(200), "v".into());
        let m = msg(ok("p", "", &svc, &l));
        assert!(m.contains(&format!("\"{}\"", "x".repeat(64))) && !m.contains(&"x".repeat(65)), "{m}");
    }
}
