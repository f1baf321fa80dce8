//! The demo's Rust plugin: serves `demo.v1.ValidatorService` through the
//! operator at `$OPF_DEMO_TARGET`, registered as `$OPF_DEMO_PLUGIN_NAME`
//! (default `validator-rust`, so that the operator can call it by name
//! beside the Go `validator`), until SIGTERM, Ctrl-C or the end of its
//! standard input (so that it never outlives the demo that started it).

use opf::Plugin;
use validator_plugin::Validator;
use validator_plugin::demo::validator_service_server::ValidatorServiceServer;

#[tokio::main]
async fn main() -> Result<(), opf::Error> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())) // plain text in the demo's output
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let target = std::env::var("OPF_DEMO_TARGET").unwrap_or_else(|_| "unix:///tmp/opf-demo/op.sock".into());
    // Standard input is read on a thread of its own: tokio's stdin would
    // keep the runtime from shutting down while its read blocks.
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0) {}
        let _ = eof_tx.send(());
    });
    let stop = async {
        tokio::select! {
            _ = opf::shutdown_signal() => {}
            _ = eof_rx => {}
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
