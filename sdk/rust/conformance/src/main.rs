//! The Rust SDK's plugin program for the conformance suite
//! (docs/conformance.md): it serves `conformance.v1.ConformanceService`
//! through the SDK with the settings of the `OPF_CONFORMANCE_*` variables,
//! and drains on SIGTERM. With `OPF_CONFORMANCE_DIRECT_LISTEN` it serves
//! the same service on a plain tonic server instead, for the benchmarks.

use std::time::Duration;

use opf_conformance::Conformance;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    env(name).map(|v| v.parse().map_err(|_| format!("{name}: {v:?} is not a number"))).transpose()
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    if let Err(e) = run().await {
        eprintln!("conformance plugin: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let svc = Conformance::default();
    if let Some(addr) = env("OPF_CONFORMANCE_DIRECT_LISTEN") {
        return direct(&addr, svc).await;
    }
    let (Some(target), Some(name)) = (env("OPF_CONFORMANCE_TARGET"), env("OPF_CONFORMANCE_PLUGIN_NAME")) else {
        return Err("OPF_CONFORMANCE_TARGET and OPF_CONFORMANCE_PLUGIN_NAME must be set".into());
    };
    let mut b =
        opf::Plugin::builder(name, env("OPF_CONFORMANCE_PLUGIN_VERSION").unwrap_or_default()).add_service(svc.server());
    if let Some(n) = number::<u32>("OPF_CONFORMANCE_MAX_MESSAGE_SIZE")? {
        b = b.max_message_size(n);
    }
    if let Some(ms) = number::<u64>("OPF_CONFORMANCE_DRAIN_TIMEOUT_MS")? {
        b = b.drain_timeout(Duration::from_millis(ms));
    }
    if let Some(ca) = env("OPF_CONFORMANCE_TLS_CA") {
        let mut tls = opf::Tls::new().ca_file(ca);
        if let Some(n) = env("OPF_CONFORMANCE_TLS_SERVER_NAME") {
            tls = tls.server_name(n);
        }
        b = b.tls(tls);
    }
    if let Some(token) = env("OPF_CONFORMANCE_TOKEN") {
        // The runner asks for the token over its plaintext unix socket too.
        b = b.static_token(token).plaintext_token();
    }
    b.serve_with_shutdown(&target, async {
        opf::shutdown_signal().await;
        tracing::info!("draining");
    })
    .await
    .map_err(|e| e.to_string())
}

/// Serves the service on a plain tonic server: the benchmarks' baseline.
async fn direct(addr: &str, svc: Conformance) -> Result<(), String> {
    let server = tonic::transport::Server::builder().add_service(svc.server());
    let stop = opf::shutdown_signal();
    if let Some(path) = addr.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
        let lis = tokio::net::UnixListener::bind(path).map_err(|e| format!("listen on {addr}: {e}"))?;
        println!("listening");
        server
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(lis), stop)
            .await
            .map_err(|e| e.to_string())
    } else {
        let lis = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("listen on {addr}: {e}"))?;
        println!("listening");
        let incoming = tonic::transport::server::TcpIncoming::from(lis).with_nodelay(Some(true));
        server.serve_with_incoming_shutdown(incoming, stop).await.map_err(|e| e.to_string())
    }
}
