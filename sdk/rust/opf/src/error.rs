//! The SDK's error type.

/// Why a plugin could not be created or started. Failures of a running
/// plugin (a lost tunnel, a refused registration) are logged and retried,
/// never returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operator's address is not one of the accepted forms.
    #[error(
        "invalid target {target:?}: {reason} (accepted: unix:///ABSOLUTE/PATH, unix:/ABSOLUTE/PATH, \
         dns:///HOST:PORT, HOST:PORT, tcp://HOST:PORT, ipv4:ADDR:PORT[,ADDR:PORT]..., ipv6:[ADDR]:PORT[,[ADDR]:PORT]...)"
    )]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registration breaks a rule the operator checks (spec §4.4).
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    /// An option is out of range, or options conflict.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The TLS configuration cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The bearer token cannot be sent as configured.
    #[error("token: {0}")]
    Token(String),
}
