//! A payload-verifying stress run through the real Go server: random sizes
//! from 0 B to 3 MiB, clustered around the chunk, window and batch
//! boundaries, random content, all four RPC kinds at once, every byte
//! checked. `OPF_STRESS_SEED` replays a run; `OPF_STRESS_CALLS` sizes it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use opf_conformance::payload;
use opf_conformance::pb::*;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt as _;

/// xorshift64*: reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Bytes {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v.into()
    }

    /// A size near a boundary of the tunnel (chunk cost, 16 KiB, 64 KiB
    /// batch, a quarter window, the 2 MiB window and chunk) or anywhere up
    /// to 3 MiB.
    fn size(&mut self) -> u32 {
        const EDGES: [u32; 9] = [0, 64, 16 << 10, 64 << 10, 512 << 10, 1 << 20, (2 << 20) - 64, 2 << 20, 3 << 20];
        if self.below(3) == 0 {
            return self.below((3 << 20) + 1) as u32;
        }
        let e = EDGES[self.below(EDGES.len() as u64) as usize] as i64;
        (e + self.below(129) as i64 - 64).clamp(0, 3 << 20) as u32
    }
}

fn digest(payloads: &[Bytes]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in payloads {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    h.finalize().to_vec()
}

fn sizes_action(sizes: Vec<u32>, seed: u64) -> Option<Action> {
    Some(Action { response_sizes: sizes, seed, ..Default::default() })
}

/// One random call, checked byte for byte; returns the bytes checked.
async fn call(c: &mut Client, rng: &mut Rng) -> u64 {
    let seed = rng.next() | 1;
    match rng.below(4) {
        0 => {
            if rng.below(2) == 0 {
                let n = rng.size() as usize;
                let p = rng.bytes(n);
                let r = c.unary(UnaryRequest { payload: p.clone(), action: None }).await.unwrap().into_inner();
                assert!(r.payload == p, "unary echo of {} bytes", p.len());
                2 * p.len() as u64
            } else {
                let n = rng.size();
                let r =
                    c.unary(UnaryRequest { payload: Bytes::new(), action: sizes_action(vec![n], seed) }).await.unwrap();
                assert!(r.into_inner().payload == payload(n, seed, 0), "unary generated {n} bytes");
                u64::from(n)
            }
        }
        1 => {
            let sizes: Vec<u32> = (0..1 + rng.below(4)).map(|_| rng.size()).collect();
            let req = ServerStreamRequest { payload: Bytes::new(), action: sizes_action(sizes.clone(), seed) };
            let mut s = c.server_stream(req).await.unwrap().into_inner();
            let mut total = 0;
            for (k, &n) in sizes.iter().enumerate() {
                let m = s.next().await.expect("a message").unwrap();
                assert_eq!(m.index as usize, k);
                assert!(m.payload == payload(n, seed, k as u32), "server stream message {k} of {n} bytes");
                total += u64::from(n);
            }
            assert!(s.next().await.is_none());
            total
        }
        2 => {
            let payloads: Vec<Bytes> = (0..1 + rng.below(4))
                .map(|_| {
                    let n = rng.size() as usize;
                    rng.bytes(n)
                })
                .collect();
            let n = rng.size();
            let reqs: Vec<_> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| ClientStreamRequest {
                    payload: p.clone(),
                    action: if i == 0 { sizes_action(vec![n], seed) } else { None },
                })
                .collect();
            let r = c.client_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
            assert_eq!(r.request_count as usize, payloads.len());
            assert_eq!(r.request_digest.to_vec(), digest(&payloads), "every request byte arrived in order");
            assert!(r.payload == payload(n, seed, 0));
            payloads.iter().map(|p| p.len() as u64).sum::<u64>() + u64::from(n)
        }
        _ => {
            let payloads: Vec<Bytes> = (0..1 + rng.below(3))
                .map(|_| {
                    let n = rng.size() as usize;
                    rng.bytes(n)
                })
                .collect();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let echo = |p: &Bytes| BidiStreamRequest {
                payload: p.clone(),
                action: Some(Action { response_count: 1, ..Default::default() }),
            };
            tx.send(echo(&payloads[0])).await.unwrap();
            let mut s = c.bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
            let mut total = 0;
            for (k, p) in payloads.iter().enumerate() {
                if k > 0 {
                    tx.send(echo(p)).await.unwrap();
                }
                let m = s.next().await.expect("an answer").unwrap();
                assert!(m.payload == *p, "bidi echo {k} of {} bytes", p.len());
                total += 2 * p.len() as u64;
            }
            drop(tx);
            assert!(s.next().await.is_none());
            total
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_every_byte_checked() {
    init_logs();
    let seed: u64 = std::env::var("OPF_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let calls: u64 = std::env::var("OPF_STRESS_CALLS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let dir = Dir::new();
    let mut op = Operator::start(&dir, "op", None, &[]).await;
    let plugin = Plugin::start(&op.listen, |b| b);
    op.next("registered", Duration::from_secs(10)).await.unwrap();
    let client = op.client().await;
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    const WORKERS: u64 = 8;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let mut c = client.clone();
        let bytes = bytes.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
            for _ in 0..calls / WORKERS {
                bytes.fetch_add(call(&mut c, &mut rng).await, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(300), t).await.expect("the stress run ends in time").unwrap();
    }
    let total = bytes.load(Ordering::Relaxed);
    eprintln!(
        "stress (seed {seed}): {} calls, {total} bytes checked ({:.1} MiB) in {:.1?}",
        calls / WORKERS * WORKERS,
        total as f64 / 1048576.0,
        start.elapsed()
    );
    assert!(total > 0);
    plugin.shutdown().await;
    op.stop().await;
}
