//! Serve [tonic] gRPC services to a Kubernetes operator through the
//! Operator Plugin Framework's tunnel.
//!
//! A plugin dials the operator and keeps one gRPC stream open to it, the
//! *tunnel*, over which it registers under a name. The operator then calls
//! the plugin's own gRPC services through the tunnel, as if it had dialled
//! the plugin. The wire protocol is specified in `docs/tunnel-spec.md` of
//! the repository (protocol version 2).
//!
//! The services are the servers tonic generates for your `.proto`,
//! unchanged: add them as you would to `tonic::transport::Server`.
//!
//! ```no_run
//! use opf::Plugin;
//! // The code tonic generated for demo.proto, and its implementation:
//! // here the repository's demo validator (sdk/rust/examples/validator).
//! use validator_plugin::demo::validator_service_server::ValidatorServiceServer;
//! use validator_plugin::Validator;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), opf::Error> {
//!     Plugin::builder("validator", "v1.0.0")
//!         .add_service(ValidatorServiceServer::new(Validator::default()))
//!         .serve_with_shutdown("unix:///var/run/opf/op.sock", opf::shutdown_signal())
//!         .await
//! }
//! ```
//!
//! Options have the Go client's defaults; a bad target or registration is
//! refused when the plugin is built, before anything is dialled:
//!
//! ```
//! use std::time::Duration;
//! use validator_plugin::demo::validator_service_server::ValidatorServiceServer;
//!
//! let plugin = opf::Plugin::builder("validator", "v1.0.0")
//!     .add_service(ValidatorServiceServer::new(validator_plugin::Validator))
//!     .label("pod", "validator-7c9f")
//!     .drain_timeout(Duration::from_secs(5))
//!     .build("dns:///operator.ns.svc:7443");
//! assert!(plugin.is_ok());
//!
//! let err = opf::Plugin::builder("validator", "v1.0.0")
//!     .add_service(ValidatorServiceServer::new(validator_plugin::Validator))
//!     .build("https://operator:443")
//!     .err()
//!     .unwrap();
//! assert!(err.to_string().contains("accepted: unix:///ABSOLUTE/PATH"));
//! ```
//!
//! # What a handler sees
//!
//! - The caller's metadata, binary (`-bin`) values included, as tonic's
//!   `MetadataMap` (base64 for `-bin` keys, as on any tonic server).
//! - The caller's deadline, as a `grpc-timeout` header and as a
//!   [`Deadline`] in the request's extensions. The SDK enforces it: when it
//!   passes, the handler's future is dropped and the call ends with
//!   `DEADLINE_EXCEEDED`.
//! - A cancel from the caller drops the handler's future.
//! - A returned `tonic::Status` keeps its code, message, details and
//!   metadata; a panic ends the call with `INTERNAL` and the tunnel goes
//!   on serving.
//! - [`ResponseMetadata`], in the request's extensions, sends headers with
//!   an error and trailers with a success, which tonic's API cannot.
//!
//! # Connections
//!
//! The plugin keeps one registered tunnel to each address its target
//! resolves to, and to each replica of an operator that runs several
//! (one tunnel per replica, duplicates closed), reconnecting with
//! exponential backoff and jitter. On shutdown it drains: it sends
//! `GoAway`, lets calls in flight finish within the drain timeout, then
//! closes. Logs go through [`tracing`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod call;
mod credentials;
mod dial;
mod error;
mod plugin;
mod proto;
mod target;
mod tunnel;

pub use backoff::Backoff;
pub use call::{Deadline, ResponseMetadata};
pub use credentials::{SERVICE_ACCOUNT_TOKEN_PATH, Tls};
pub use error::Error;
pub use plugin::{Plugin, PluginBuilder};
pub use prost;
pub use tonic;

/// Completes on SIGTERM (what Kubernetes sends a pod to stop it) or
/// Ctrl-C, for [`PluginBuilder::serve_with_shutdown`].
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
