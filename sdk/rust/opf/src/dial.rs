//! Opens the HTTP/2 connection of one tunnel: a unix or TCP socket, TLS
//! when configured (the CA file read again each time), then h2's
//! handshake. The tunnel drives the `Connect` call on it itself
//! (tunnel::writer says why).

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::credentials::Tls;
use crate::target::{Addr, Target};
use crate::tunnel::H2;

/// HTTP/2 windows of the `Connect` connection: above the tunnel's own
/// windows, so that HTTP/2 never holds a stream back.
const H2_STREAM_WINDOW: u32 = 16 << 20;
const H2_CONNECTION_WINDOW: u32 = 32 << 20;

/// Any of the sockets a tunnel runs on, so that h2 is built once.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection ready for the `Connect` call, and the task that drives it
/// (it ends once the connection closes or nothing uses it any more).
pub(crate) struct Dialled {
    pub(crate) h2: H2,
    pub(crate) task: JoinHandle<()>,
}

pub(crate) async fn dial(target: &Target, tls: Option<&Tls>, addr: &Addr) -> Result<Dialled, String> {
    let tls = tls.map(|t| t.client_config(target)).transpose().map_err(|e| e.to_string())?;
    let authority = match (addr, target) {
        (Addr::Unix(_), _) => "localhost".to_owned(),
        (Addr::Tcp(_), Target::Host { host, port }) if !host.contains(':') => format!("{host}:{port}"),
        (Addr::Tcp(sa), _) => sa.to_string(),
    };
    let dialled = |e: std::io::Error| format!("dial {addr:?}: {e}");
    let io: Box<dyn Io> = match addr {
        Addr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await.map_err(dialled)?),
        Addr::Tcp(sa) => {
            let s = tokio::net::TcpStream::connect(sa).await.map_err(dialled)?;
            s.set_nodelay(true).map_err(dialled)?;
            Box::new(s)
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let io: Box<dyn Io> = match tls {
        None => io,
        Some(t) => {
            let s = TlsConnector::from(Arc::clone(&t.config))
                .connect(t.server_name, io)
                .await
                .map_err(|e| format!("dial {addr:?}: TLS: {}", chain(&e)))?;
            if s.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(format!("dial {addr:?}: TLS: the operator did not agree to HTTP/2 (ALPN h2)"));
            }
            Box::new(s)
        }
    };
    let (send, conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("dial {addr:?}: HTTP/2: {e}"))?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("HTTP/2 connection ended: {e}");
        }
    });
    Ok(Dialled { h2: H2 { send, scheme, authority }, task })
}

/// An error and its sources, for messages that say what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
