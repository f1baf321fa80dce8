//! The SDK against the real Go server (conformance/cmd/testoperator): every
//! RPC kind, metadata, status details, deadlines, cancellation, panics,
//! reconnection, drain, a plugin killed mid-call, and several operators.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use opf_conformance::pb::*;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic::metadata::{MetadataMap, MetadataValue};

const SEC: Duration = Duration::from_secs(1);

fn action(f: impl FnOnce(&mut Action)) -> Option<Action> {
    let mut a = Action::default();
    f(&mut a);
    Some(a)
}

fn unary(payload: &[u8], a: Option<Action>) -> UnaryRequest {
    UnaryRequest { payload: Bytes::copy_from_slice(payload), action: a }
}

async fn setup() -> (Dir, Operator, Plugin, Client) {
    init_logs();
    let dir = Dir::new();
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    let plugin = Plugin::start(&op.listen, |b| b);
    op.next("registered", 10 * SEC).await.expect("the plugin registers");
    let client = op.client().await;
    (dir, op, plugin, client)
}

async fn observation(c: &mut Client, key: &str) -> Observation {
    let r = c
        .get_observation(GetObservationRequest {
            key: key.into(),
            wait: Some(prost_types::Duration { seconds: 3, nanos: 0 }),
        })
        .await
        .expect("an observation was recorded");
    r.into_inner().observation.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_kind() {
    let (_dir, op, plugin, mut c) = setup().await;

    let r = c.unary(unary(b"hello", None)).await.unwrap().into_inner();
    assert_eq!(&r.payload[..], b"hello");

    let req =
        ServerStreamRequest { payload: Bytes::new(), action: action(|a| a.response_sizes = vec![0, 1, 70_000, 3]) };
    let mut s = c.server_stream(req).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        got.push((m.index, m.payload.len()));
        assert_eq!(m.payload, opf_conformance::payload(m.payload.len() as u32, 0, m.index));
    }
    assert_eq!(got, vec![(0, 0), (1, 1), (2, 70_000), (3, 3)]);

    let reqs = (0..5).map(|i| ClientStreamRequest { payload: vec![i as u8; i * 1000].into(), action: None });
    let r = c.client_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    assert_eq!((r.request_count, r.request_bytes), (5, 10_000));
    assert_eq!(r.payload.len(), 4000, "echoes the last request");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = |i: u8| BidiStreamRequest { payload: vec![i; 10].into(), action: action(|a| a.response_count = 2) };
    // The proxy answers with headers once the plugin has answered: the
    // first request goes before the response is awaited.
    tx.send(req(0)).await.unwrap();
    let mut responses = c.bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for i in 0..3u8 {
        if i > 0 {
            tx.send(req(i)).await.unwrap();
        }
        for j in 0..2 {
            let m = responses.next().await.unwrap().unwrap();
            assert_eq!(m.index, u32::from(i) * 2 + j);
            assert_eq!(&m.payload[..], &[i; 10]);
        }
    }
    drop(tx);
    assert!(responses.next().await.is_none(), "ends with OK after the half-close");

    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_binary_values_headers_and_trailers() {
    let (_dir, op, plugin, mut c) = setup().await;
    let mut req = tonic::Request::new(unary(
        b"",
        action(|a| {
            a.observe = true;
            a.headers = vec![MetadataEntry { key: "x-h-bin".into(), values: vec![Bytes::from_static(&[0, 1, 255])] }];
            a.trailers = vec![MetadataEntry { key: "x-t".into(), values: vec!["t1".into(), "t2".into()] }];
        }),
    ));
    req.metadata_mut().insert("x-text", "hello".parse().unwrap());
    req.metadata_mut().append("x-multi", "one".parse().unwrap());
    req.metadata_mut().append("x-multi", "two".parse().unwrap());
    req.metadata_mut().insert_bin("x-data-bin", MetadataValue::from_bytes(&[0, 1, 2, 0xfd, 0xfe, 0xff]));
    let resp = c.unary(req).await.unwrap();
    let md = resp.metadata();
    assert_eq!(md.get_bin("x-h-bin").unwrap().to_bytes().unwrap().as_ref(), &[0, 1, 255]);
    let t: Vec<_> = md.get_all("x-t").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(t, ["t1", "t2"]);
    let obs = resp.into_inner().observation.unwrap();
    let seen: Vec<(String, Vec<Vec<u8>>)> =
        obs.metadata.iter().map(|e| (e.key.clone(), e.values.iter().map(|v| v.to_vec()).collect())).collect();
    assert_eq!(
        seen,
        vec![
            ("x-data-bin".into(), vec![vec![0, 1, 2, 0xfd, 0xfe, 0xff]]),
            ("x-multi".into(), vec![b"one".to_vec(), b"two".to_vec()]),
            ("x-text".into(), vec![b"hello".to_vec()]),
        ],
        "exactly the caller's metadata, binary values raw"
    );
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_code_message_and_details() {
    let (_dir, op, plugin, mut c) = setup().await;
    let detail = prost_types::Any {
        type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
        value: vec![10, 3, 10, 1, 120],
    };
    let fail = opf_conformance::pb::google::rpc::Status {
        code: Code::FailedPrecondition as i32,
        message: "nope: ünïcødé ✓".into(),
        details: vec![detail.clone()],
    };
    let e = c.unary(unary(b"", action(|a| a.fail = Some(fail.clone())))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), "nope: ünïcødé ✓");
    let details = opf_conformance::pb::google::rpc::Status::decode(e.details()).unwrap();
    assert_eq!(details.details, vec![detail]);

    let e = c.unary(unary(b"", action(|a| a.panic = true))).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("handler panicked"), "{}", e.message());
    assert_eq!(&c.unary(unary(b"alive", None)).await.unwrap().into_inner().payload[..], b"alive");

    let mut raw = tonic::client::Grpc::new(unix_channel(&op.proxy).await);
    raw.ready().await.unwrap();
    // (An unknown service is not routed to the plugin at all: the operator
    // has no instance serving it, and the proxy waits for one.)
    let path = http::uri::PathAndQuery::from_static("/conformance.v1.ConformanceService/NoSuchMethod");
    let codec = tonic_prost::ProstCodec::<UnaryRequest, UnaryResponse>::default();
    let mut req = tonic::Request::new(UnaryRequest::default());
    req.set_timeout(5 * SEC);
    let e = raw.unary(req, path, codec).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("NoSuchMethod"), "{e:?}");
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_enforced_and_seen() {
    let (_dir, op, plugin, mut c) = setup().await;
    let mut req = tonic::Request::new(unary(
        b"",
        action(|a| {
            a.sleep = Some(prost_types::Duration { seconds: 10, nanos: 0 });
            a.record_key = "slow".into();
        }),
    ));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let e = c.unary(req).await.unwrap_err();
    // The proxy's gRPC server ends a call whose deadline passed with
    // RST_STREAM(CANCEL) or DEADLINE_EXCEEDED, depending on who is first:
    // what matters here is how soon, and what the handler saw.
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    let obs = observation(&mut c, "slow").await;
    assert!(obs.cancelled, "the handler's future was dropped at the deadline");
    let left = obs.deadline_left.unwrap();
    assert!(left.seconds == 0 && left.nanos > 100_000_000 && left.nanos <= 300_000_000, "{left:?}");
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_cancel_drops_the_handler() {
    let (_dir, op, plugin, mut c) = setup().await;
    let mut c2 = c.clone();
    let call = tokio::spawn(async move {
        c2.unary(unary(
            b"",
            action(|a| {
                a.wait_for_cancel = true;
                a.record_key = "k".into();
            }),
        ))
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    let obs = observation(&mut c, "k").await;
    assert!(obs.cancelled);
    // The tunnel goes on serving.
    assert_eq!(&c.unary(unary(b"x", None)).await.unwrap().into_inner().payload[..], b"x");
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_operator_restarts() {
    init_logs();
    let dir = Dir::new();
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    let plugin = Plugin::start(&op.listen, |b| b);
    op.next("registered", 10 * SEC).await.unwrap();
    op.crash().await;
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    op.next("registered", 10 * SEC).await.expect("registers again after a crash");
    let mut c = op.client().await;
    assert_eq!(&c.unary(unary(b"back", None)).await.unwrap().into_inner().payload[..], b"back");
    // A graceful restart: GoAway, drain, then a new server.
    op.stop().await;
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    op.next("registered", 10 * SEC).await.expect("registers again after a drain");
    let mut c = op.client().await;
    assert_eq!(&c.unary(unary(b"again", None)).await.unwrap().into_inner().payload[..], b"again");
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_leave_no_task_behind() {
    // Each tunnel runs on tasks of its own (its connection, the tunnel, its
    // writer): after crashes and drains of the operator, the plugin holds
    // what it held with one tunnel.
    let (dir, mut op, plugin, client) = setup().await;
    drop(client);
    let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    tokio::time::sleep(SEC).await;
    let before = alive();
    for i in 0..6 {
        if i % 2 == 0 {
            op.crash().await
        } else {
            op.stop().await
        }
        op = Operator::start(&dir, "op", None, &[]).await;
        op.next("registered", 10 * SEC).await.expect("registers again");
        let mut c = op.client().await;
        assert_eq!(&c.unary(unary(b"x", None)).await.unwrap().into_inner().payload[..], b"x");
    }
    let deadline = Instant::now() + 5 * SEC;
    while alive() > before && Instant::now() < deadline {
        tokio::time::sleep(SEC / 10).await;
    }
    assert!(alive() <= before, "{} tasks alive after 6 reconnects, {before} before", alive());
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_calls_in_flight() {
    let (_dir, mut op, plugin, mut c) = setup().await;
    let call = tokio::spawn(async move {
        c.unary(unary(b"last", action(|a| a.sleep = Some(prost_types::Duration { seconds: 0, nanos: 600_000_000 }))))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    plugin.shutdown().await;
    let r = call.await.unwrap().expect("the call in flight finishes during the drain");
    assert_eq!(&r.into_inner().payload[..], b"last");
    assert!(start.elapsed() >= Duration::from_millis(300), "shutdown waited for the call");
    op.next("unregistered", 5 * SEC).await.expect("the instance leaves the registry");
    let mut c = op.client().await;
    let mut req = tonic::Request::new(unary(b"", None));
    req.set_timeout(Duration::from_millis(300));
    assert!(c.unary(req).await.is_err(), "no plugin any more");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_killed_mid_call() {
    init_logs();
    let dir = Dir::new();
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_conformance-plugin"))
        .env("OPF_CONFORMANCE_TARGET", &op.listen)
        .env("OPF_CONFORMANCE_PLUGIN_NAME", "conformance")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    op.next("registered", 10 * SEC).await.unwrap();
    let mut c = op.client().await;
    let call = tokio::spawn(async move { c.unary(unary(b"", action(|a| a.wait_for_cancel = true))).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "KILL");
    let start = Instant::now();
    let e = tokio::time::timeout(5 * SEC, call).await.expect("the call ends promptly").unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(start.elapsed() < 3 * SEC);
    op.next("unregistered", 5 * SEC).await.unwrap();
    op.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tunnel_per_operator() {
    init_logs();
    let dir = Dir::new();
    let (p1, p2) = (free_port(), free_port());
    let mut a = Operator::start(&dir, "a", Some(&format!("127.0.0.1:{p1}")), &[]).await;
    let mut b = Operator::start(&dir, "b", Some(&format!("127.0.0.1:{p2}")), &[]).await;
    let plugin = Plugin::start(&format!("ipv4:127.0.0.1:{p1},127.0.0.1:{p2}"), |b| b);
    a.next("registered", 10 * SEC).await.expect("a tunnel to the first operator");
    b.next("registered", 10 * SEC).await.expect("a tunnel to the second operator");
    for op in [&a, &b] {
        let mut c = op.client().await;
        assert_eq!(&c.unary(unary(b"hi", None)).await.unwrap().into_inner().payload[..], b"hi");
    }
    assert_eq!(a.count("registered", SEC).await, 0, "one tunnel each");
    assert_eq!(b.count("registered", SEC).await, 0, "one tunnel each");
    plugin.shutdown().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_tunnels_to_one_replica_are_closed() {
    init_logs();
    let dir = Dir::new();
    let port = free_port();
    // One operator reached at two addresses: the same replica twice.
    let mut op = Operator::start(&dir, "op", Some(&format!(":{port}")), &[]).await;
    let plugin = Plugin::start(&format!("ipv4:127.0.0.1:{port},127.0.0.2:{port}"), |b| b);
    op.next("registered", 10 * SEC).await.expect("one tunnel registers");
    assert_eq!(op.count("registered", 3 * SEC).await, 0, "the second tunnel to the replica never registers");
    let mut c = op.client().await;
    assert_eq!(&c.unary(unary(b"once", None)).await.unwrap().into_inner().payload[..], b"once");
    plugin.shutdown().await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_message_limits() {
    init_logs();
    let dir = Dir::new();
    let mut op = Operator::start(&dir, "op", None, &["-token", "s3cret"]).await;
    let plugin = Plugin::start(&op.listen, |b| b.static_token("s3cret").plaintext_token().max_message_size(1 << 20));
    op.next("registered", 10 * SEC).await.expect("registers with the token");
    let mut c = op.client().await;
    // The plugin's limit (1 MiB) applies to requests, not to responses.
    let r = c.unary(unary(b"", action(|a| a.response_size = 3 << 20))).await.unwrap().into_inner();
    assert_eq!(r.payload, opf_conformance::payload(3 << 20, 0, 0));
    let e = c.unary(unary(&vec![0u8; 2 << 20], None)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("larger than max"), "{e:?}");
    let r = c.unary(unary(&vec![9u8; (1 << 20) - 16], None)).await.unwrap().into_inner();
    assert_eq!(r.payload.len(), (1 << 20) - 16);
    plugin.shutdown().await;
    op.stop().await;

    // A wrong token is refused and retried, never registered.
    let mut op = Operator::start(&dir, "op2", None, &["-token", "s3cret"]).await;
    let plugin = Plugin::start(&op.listen, |b| b.static_token("wrong").plaintext_token());
    assert!(op.next("registered", 2 * SEC).await.is_none());
    plugin.shutdown().await;
    op.stop().await;
}

#[test]
fn construction_refuses_bad_targets_and_tokens() {
    let b = || opf::Plugin::builder("p", "v").add_service(opf_conformance::Conformance::default().server());
    let e = b().build("http://op:80").err().unwrap().to_string();
    assert!(e.contains("\"http://op:80\"") && e.contains("unix:///ABSOLUTE/PATH"), "{e}");
    assert!(b().static_token("t").build("unix:///x.sock").is_err(), "a token needs TLS or plaintext_token");
    assert!(b().static_token("t").plaintext_token().build("dns:///op.example:443").is_err());
    assert!(b().static_token("t").plaintext_token().build("127.0.0.1:1").is_ok());
    let _ = MetadataMap::new();
}

/// A tower layer's service: counts the calls it sees.
#[derive(Clone)]
struct Counting<S> {
    inner: S,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<S, B> tower::Service<http::Request<B>> for Counting<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.call(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interceptors_and_layers_apply() {
    init_logs();
    let dir = Dir::new();
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = opf_conformance::pb::conformance_service_server::ConformanceServiceServer::with_interceptor(
        opf_conformance::Conformance::default(),
        |req: tonic::Request<()>| match req.metadata().get("x-key") {
            Some(v) if v == "open sesame" => Ok(req),
            _ => Err(tonic::Status::unauthenticated("no key")),
        },
    );
    let counted = seen.clone();
    let plugin = opf::Plugin::builder("conformance", "v1")
        .add_service(svc)
        .layer(tower::layer::layer_fn(move |inner| Counting { inner, seen: counted.clone() }))
        .build(&op.listen)
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(plugin.serve_with_shutdown(async move {
        let _ = rx.await;
    }));
    op.next("registered", 10 * SEC).await.unwrap();
    let mut c = op.client().await;
    let e = c.unary(unary(b"", None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "the interceptor refused");
    let mut req = tonic::Request::new(unary(b"in", None));
    req.metadata_mut().insert("x-key", "open sesame".parse().unwrap());
    assert_eq!(&c.unary(req).await.unwrap().into_inner().payload[..], b"in");
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 2, "the layer saw both calls");
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    op.stop().await;
}
