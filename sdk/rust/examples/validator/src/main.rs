//! The demo's Rust plugin: serves `demo.v1.ValidatorService` through the
//! operator at `$OPF_DEMO_TARGET`, registered as `$OPF_DEMO_PLUGIN_NAME`
//! (default `validator-rust`, so that the operator can call it by name
//! beside the Go `validator`), until SIGTERM, Ctrl-C or the end of its
//! standard input (so that it never outlives the demo that started it).

use opf::Plugin;
use tokio::io::AsyncReadExt as _;
use validator_plugin::Validator;
use validator_plugin::demo::validator_service_server::ValidatorServiceServer;

#[tokio::main]
async fn main() -> Result<(), opf::Error> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let target = std::env::var("OPF_DEMO_TARGET").unwrap_or_else(|_| "unix:///tmp/opf-demo/op.sock".into());
    let stop = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        tokio::select! {
            _ = opf::shutdown_signal() => {}
            _ = async { while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {} } => {}
        }
        tracing::info!("draining");
    };
    let name = std::env::var("OPF_DEMO_PLUGIN_NAME").unwrap_or_else(|_| "validator-rust".into());
    Plugin::builder(name, "v1.0.0")
        .label("language", "rust")
        .add_service(ValidatorServiceServer::new(Validator))
        .serve_with_shutdown(&target, stop)
        .await
}
