//! TLS and bearer tokens, both read again at every (re)connection.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};

use crate::Error;
use crate::target::Target;

/// Where Kubernetes mounts a pod's ServiceAccount token.
pub const SERVICE_ACCOUNT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// TLS to the operator (rustls, with the ring provider).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
}

impl Tls {
    /// TLS that trusts the system's roots and verifies the target's host
    /// (`localhost` for a unix socket, the address for an IP target).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the certificate authorities in this PEM file instead of the
    /// system's. The file is read again at every (re)connection, so a CA
    /// rotated in place is trusted from the next tunnel on.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The name the operator's certificate must carry. Default: the host
    /// of the target.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Reads the CA file and builds the connection's TLS configuration:
    /// rustls with ring, HTTP/2 by ALPN, and the name to verify.
    pub(crate) fn client_config(&self, target: &Target) -> Result<TlsConnect, Error> {
        let name = self.server_name.clone().unwrap_or_else(|| target.default_server_name());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| Error::Tls(format!("server name {name:?}: {e}")))?;
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    return Err(Error::Tls(format!("no system root certificate found: {:?}", found.errors)));
                }
                roots.add_parsable_certificates(found.certs);
            }
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| Error::Tls(format!("read CA bundle {}: {e}", path.display())))?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::Tls(format!("CA bundle {}: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(Error::Tls(format!("CA bundle {} holds no PEM certificate", path.display())));
                }
                let (_, bad) = roots.add_parsable_certificates(certs);
                if roots.is_empty() {
                    return Err(Error::Tls(format!(
                        "CA bundle {}: none of its {bad} certificates could be used",
                        path.display()
                    )));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnect { config: Arc::new(cfg), server_name })
    }
}

/// What one connection's TLS handshake needs.
pub(crate) struct TlsConnect {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
}

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub(crate) enum TokenSource {
    File(PathBuf),
    Static(String),
}

impl TokenSource {
    /// Reads the token (a file again at every connection), surrounding
    /// white space ignored.
    pub(crate) fn read(&self) -> Result<String, Error> {
        let t = match self {
            Self::Static(t) => t.clone(),
            Self::File(p) => std::fs::read_to_string(p)
                .map_err(|e| Error::Token(format!("read token {}: {e}", p.display())))?
                .trim()
                .to_owned(),
        };
        if t.is_empty() {
            return Err(Error::Token(match self {
                Self::Static(_) => "empty static token".into(),
                Self::File(p) => format!("read token: {} is empty", p.display()),
            }));
        }
        Ok(t)
    }
}

/// Checks the token rules at construction: a token needs TLS, unless
/// plaintext is allowed and the target is a unix socket or loopback.
pub(crate) fn check(
    target: &Target,
    target_str: &str,
    tls: Option<&Tls>,
    token: Option<&TokenSource>,
    plaintext_token: bool,
) -> Result<(), Error> {
    if let Some(t) = tls {
        t.client_config(target)?;
    }
    if token.is_none() || tls.is_some() {
        return Ok(());
    }
    if !plaintext_token {
        return Err(Error::Token(
            "refusing to send a token without TLS: use tls(), or plaintext_token() for a unix socket or loopback target"
                .into(),
        ));
    }
    if !target.is_local() {
        return Err(Error::Token(format!(
            "refusing to send a token over plaintext to {target_str:?}: plaintext_token() allows only a unix socket or a loopback address"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rules() {
        let unix = Target::parse("unix:///x").unwrap();
        let remote = Target::parse("dns:///op.svc:443").unwrap();
        let tok = TokenSource::Static("t".into());
        assert!(check(&unix, "u", None, Some(&tok), false).is_err());
        assert!(check(&unix, "u", None, Some(&tok), true).is_ok());
        let e = check(&remote, "dns:///op.svc:443", None, Some(&tok), true).unwrap_err().to_string();
        assert!(e.contains("\"dns:///op.svc:443\""), "{e}");
        assert!(check(&remote, "r", Some(&Tls::new()), Some(&tok), false).is_ok());
        assert!(check(&remote, "r", None, None, false).is_ok());
        let missing = Tls::new().ca_file("/nonexistent/ca.pem");
        assert!(check(&remote, "r", Some(&missing), None, false).is_err());
    }

    #[test]
    fn token_file_is_trimmed_and_reread() {
        let dir = std::env::temp_dir().join(format!("opf-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, " one\n").unwrap();
        let src = TokenSource::File(p.clone());
        assert_eq!(src.read().unwrap(), "one");
        std::fs::write(&p, "two").unwrap();
        assert_eq!(src.read().unwrap(), "two");
        std::fs::write(&p, "\n").unwrap();
        assert!(src.read().is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
