//! Operator targets (spec §14.1): parsing at construction, resolution at
//! every (re)connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use crate::Error;

/// Longest unix socket path: `sun_path` less its final NUL.
const MAX_UNIX_PATH: usize = 107;

/// A parsed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Unix(PathBuf),
    /// A host name or IP literal, resolved at each (re)connection.
    Host {
        host: String,
        port: u16,
    },
    /// Fixed addresses (`ipv4:` and `ipv6:` forms).
    Addrs(Vec<SocketAddr>),
}

/// One address a tunnel dials.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Addr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

fn invalid(target: &str, reason: impl Into<String>) -> Error {
    Error::InvalidTarget { target: target.to_owned(), reason: reason.into() }
}

fn port(target: &str, p: &str) -> Result<u16, Error> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(target, format!("port {p:?} is not a decimal number")));
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(invalid(target, format!("port {p} is outside 1-65535"))),
    }
}

/// Splits `HOST:PORT`, `[V6]:PORT`.
fn host_port(target: &str, s: &str) -> Result<(String, u16), Error> {
    let (host, p) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return Err(invalid(target, "a bracketed IPv6 host must be followed by :PORT"));
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(invalid(target, format!("{h:?} is not an IPv6 address")));
        }
        (h.to_owned(), p)
    } else {
        let Some((h, p)) = s.rsplit_once(':') else {
            return Err(invalid(target, "no :PORT"));
        };
        if h.contains(':') {
            return Err(invalid(target, "an IPv6 host must be in brackets"));
        }
        if h.contains('/') || h.contains('@') {
            return Err(invalid(target, format!("{h:?} is not a host name")));
        }
        (h.to_owned(), p)
    };
    if host.is_empty() {
        return Err(invalid(target, "the host is empty"));
    }
    Ok((host, port(target, p)?))
}

impl Target {
    pub(crate) fn parse(t: &str) -> Result<Self, Error> {
        if t.is_empty() {
            return Err(invalid(t, "the target is empty"));
        }
        if let Some(rest) = t.strip_prefix("unix:") {
            let path = match rest.strip_prefix("//") {
                Some(p) if p.starts_with('/') => p,
                Some(p) => {
                    return Err(invalid(t, format!("a unix path must be absolute: write unix:///{p}")));
                }
                None => rest,
            };
            if !path.starts_with('/') {
                return Err(invalid(t, format!("a unix path must be absolute: write unix:///{path}")));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(invalid(
                    t,
                    format!("the unix path is {} bytes long, more than the limit of {MAX_UNIX_PATH}", path.len()),
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = t.strip_prefix("dns:") {
            let Some(hp) = rest.strip_prefix("///") else {
                return Err(invalid(t, "dns targets are dns:///HOST:PORT (no DNS server may be chosen)"));
            };
            let (host, port) = host_port(t, hp)?;
            return Ok(Self::Host { host, port });
        }
        if let Some(hp) = t.strip_prefix("tcp://") {
            let (host, port) = host_port(t, hp)?;
            return Ok(Self::Host { host, port });
        }
        if let Some(list) = t.strip_prefix("ipv4:") {
            let addrs = list
                .split(',')
                .map(|a| {
                    let (h, p) = host_port(t, a)?;
                    let ip: Ipv4Addr = h.parse().map_err(|_| invalid(t, format!("{h:?} is not an IPv4 address")))?;
                    Ok(SocketAddr::new(IpAddr::V4(ip), p))
                })
                .collect::<Result<_, Error>>()?;
            return Ok(Self::Addrs(addrs));
        }
        if let Some(list) = t.strip_prefix("ipv6:") {
            let addrs = list
                .split(',')
                .map(|a| {
                    if !a.starts_with('[') {
                        return Err(invalid(t, format!("{a:?}: IPv6 addresses are written [ADDR]:PORT")));
                    }
                    let (h, p) = host_port(t, a)?;
                    let ip: Ipv6Addr = h.parse().map_err(|_| invalid(t, format!("{h:?} is not an IPv6 address")))?;
                    Ok(SocketAddr::new(IpAddr::V6(ip), p))
                })
                .collect::<Result<_, Error>>()?;
            return Ok(Self::Addrs(addrs));
        }
        if t.contains("://") {
            return Err(invalid(t, "unsupported scheme"));
        }
        let (host, port) = host_port(t, t)?;
        Ok(Self::Host { host, port })
    }

    /// Whether the target is a unix socket or a loopback address, where a
    /// token may go without TLS when allowed.
    pub(crate) fn is_local(&self) -> bool {
        match self {
            Self::Unix(_) => true,
            Self::Host { host, .. } => {
                host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            Self::Addrs(a) => a.iter().all(|a| a.ip().is_loopback()),
        }
    }

    /// The name TLS verifies when none is configured: the target's host,
    /// `localhost` for a unix socket.
    pub(crate) fn default_server_name(&self) -> String {
        match self {
            Self::Unix(_) => "localhost".into(),
            Self::Host { host, .. } => host.clone(),
            Self::Addrs(a) => a[0].ip().to_string(),
        }
    }

    /// Resolves the target into a sorted list without duplicates.
    pub(crate) async fn resolve(&self) -> std::io::Result<Vec<Addr>> {
        let mut out: Vec<Addr> = match self {
            Self::Unix(p) => vec![Addr::Unix(p.clone())],
            Self::Addrs(a) => a.iter().copied().map(Addr::Tcp).collect(),
            Self::Host { host, port } => match host.parse::<IpAddr>() {
                Ok(ip) => vec![Addr::Tcp(SocketAddr::new(ip, *port))],
                Err(_) => tokio::net::lookup_host((host.as_str(), *port)).await?.map(Addr::Tcp).collect(),
            },
        };
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(std::io::Error::other(format!("{self:?} resolved to no address")));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(Target::parse("unix:///run/x.sock").unwrap(), Target::Unix("/run/x.sock".into()));
        assert_eq!(Target::parse("unix:/run/x.sock").unwrap(), Target::Unix("/run/x.sock".into()));
        let host = |h: &str, p| Target::Host { host: h.into(), port: p };
        assert_eq!(Target::parse("dns:///op.ns.svc:7443").unwrap(), host("op.ns.svc", 7443));
        assert_eq!(Target::parse("op:1").unwrap(), host("op", 1));
        assert_eq!(Target::parse("tcp://127.0.0.1:65535").unwrap(), host("127.0.0.1", 65535));
        assert_eq!(Target::parse("[::1]:80").unwrap(), host("::1", 80));
        assert_eq!(
            Target::parse("ipv4:127.0.0.1:1,10.0.0.1:2").unwrap(),
            Target::Addrs(vec!["127.0.0.1:1".parse().unwrap(), "10.0.0.1:2".parse().unwrap()])
        );
        assert_eq!(Target::parse("ipv6:[::1]:5").unwrap(), Target::Addrs(vec!["[::1]:5".parse().unwrap()]));
    }

    #[test]
    fn refused_forms_quote_the_target() {
        for t in [
            "",
            "unix://run/x.sock",
            "unix:run/x.sock",
            "dns://8.8.8.8/op:1",
            "http://op:80",
            "https://op:443",
            "op",
            "op:0",
            "op:65536",
            "op:http",
            ":80",
            "::1:80",
            "ipv4:[::1]:80",
            "ipv4:127.0.0.1",
            "ipv6:::1:80",
            "dns:///op",
        ] {
            let e = Target::parse(t).expect_err(t).to_string();
            assert!(e.contains(&format!("{t:?}")), "{e}");
            assert!(e.contains("unix:///ABSOLUTE/PATH"), "{e}");
        }
        let e = Target::parse("unix://run/x.sock").unwrap_err().to_string();
        assert!(e.contains("unix:///run/x.sock"), "{e}");
        let long = format!("unix:///{}", "a".repeat(107));
        let e = Target::parse(&long).unwrap_err().to_string();
        assert!(e.contains("108 bytes") && e.contains("107"), "{e}");
    }

    #[test]
    fn locality() {
        for (t, local) in [
            ("unix:///x", true),
            ("localhost:1", true),
            ("127.0.0.2:1", true),
            ("[::1]:1", true),
            ("ipv4:127.0.0.1:1,127.0.0.2:1", true),
            ("ipv4:127.0.0.1:1,10.0.0.1:1", false),
            ("dns:///op.svc:1", false),
        ] {
            assert_eq!(Target::parse(t).unwrap().is_local(), local, "{t}");
        }
    }

    #[tokio::test]
    async fn resolution_is_sorted_and_deduplicated() {
        let t = Target::parse("ipv4:127.0.0.2:1,127.0.0.1:1,127.0.0.2:1").unwrap();
        let got = t.resolve().await.unwrap();
        assert_eq!(got, vec![Addr::Tcp("127.0.0.1:1".parse().unwrap()), Addr::Tcp("127.0.0.2:1".parse().unwrap())]);
        let got = Target::parse("localhost:9").unwrap().resolve().await.unwrap();
        assert!(!got.is_empty());
    }
}
