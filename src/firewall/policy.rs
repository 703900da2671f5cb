//! Egress policy: domains refused before any card is posted.
//!
//! Two rules, both checked on an already normalised [`Domain`](super::domain::Domain):
//! - **Denied patterns** (`SM_DENIED_DOMAINS`): `*.suffix` matches the suffix itself and every
//!   name below it (`*.internal` matches `internal` and `metadata.internal`); any other pattern
//!   matches exactly that name.
//! - **Private resolution** (`SM_EGRESS_REFUSE_PRIVATE`): a domain whose every address is
//!   loopback, private (RFC 1918), shared (RFC 6598), link-local, unique-local (RFC 4193),
//!   unspecified or an IPv4-mapped form of these would open the firewall towards the inside
//!   network (DNS rebinding services such as `nip.io` do exactly that). Names are resolved with
//!   hickory-resolver from the bot, with the system's resolver configuration or
//!   `SM_EGRESS_DNS_SERVERS`. A name that does not resolve at all is not refused: the bot's own
//!   view of DNS may differ from the VM's, and the firewall still decides.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};

use super::domain::parse_domain;

/// One entry of `SM_DENIED_DOMAINS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// `*.suffix`: the suffix and every name below it.
    Below(String),
    /// Exactly this name.
    Exact(String),
}

impl DomainPattern {
    /// Parses `*.example.com` or `example.com`; the name part is normalised like a requested
    /// domain (lowercase, IDNA), so patterns and requests compare alike.
    ///
    /// # Errors
    /// A message naming the pattern when its name part is not a valid domain.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let (below, name) = match raw.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        // A single label (`internal`, `local`) is a valid pattern suffix, though not a valid
        // request: check it with a placeholder label in front.
        let checked = if name.contains('.') {
            parse_domain(name)
        } else {
            parse_domain(&format!("x.{name}"))
        };
        let name = match checked {
            Ok(d) if name.contains('.') => d.as_str().to_owned(),
            Ok(d) => d.as_str().trim_start_matches("x.").to_owned(),
            Err(e) => return Err(format!("{raw:?} is not a domain pattern: {e}")),
        };
        Ok(if below {
            Self::Below(name)
        } else {
            Self::Exact(name)
        })
    }

    /// Whether `domain` (normalised) matches.
    pub fn matches(&self, domain: &str) -> bool {
        match self {
            Self::Exact(name) => domain == name,
            Self::Below(suffix) => {
                domain == suffix
                    || domain
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Below(s) => write!(f, "*.{s}"),
            Self::Exact(s) => f.write_str(s),
        }
    }
}

/// Whether `ip` points inside: loopback, private, shared, link-local, unique-local,
/// unspecified, broadcast, or the IPv4-mapped form of one of these.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (first & 0xffc0) == 0xfe80 // fe80::/10 link local
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10 shared address space
}

/// Why a domain is refused before any card.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It matches a pattern of `SM_DENIED_DOMAINS`.
    #[error("it matches the denied pattern {0} (SM_DENIED_DOMAINS)")]
    Denied(String),
    /// Every address it resolves to is internal.
    #[error("it resolves only to internal addresses ({0}); the firewall does not open the inside network")]
    Internal(String),
}

/// The egress policy. Cheap to share behind an `Arc`.
pub struct EgressPolicy {
    denied: Vec<DomainPattern>,
    resolver: Option<TokioResolver>,
}

impl std::fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressPolicy")
            .field("denied", &self.denied)
            .field("refuse_private", &self.resolver.is_some())
            .finish()
    }
}

/// How long one resolution may take before the domain is let through to a card.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

impl EgressPolicy {
    /// A policy refusing `denied`; with `refuse_private`, also names that resolve only inside,
    /// asking `dns_servers` (UDP, `ip:port`) or, when empty, the system's resolvers.
    ///
    /// # Errors
    /// A message when the system resolver configuration cannot be read.
    pub fn new(
        denied: Vec<DomainPattern>,
        refuse_private: bool,
        dns_servers: &[SocketAddr],
    ) -> Result<Self, String> {
        let resolver = if !refuse_private {
            None
        } else if dns_servers.is_empty() {
            let mut builder = TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?;
            builder.options_mut().timeout = RESOLVE_TIMEOUT;
            Some(builder.build())
        } else {
            let mut config = ResolverConfig::new();
            for server in dns_servers {
                config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
            }
            let mut options = ResolverOpts::default();
            options.timeout = RESOLVE_TIMEOUT;
            options.attempts = 1;
            options.cache_size = 0;
            Some(
                Resolver::builder_with_config(config, TokioConnectionProvider::default())
                    .with_options(options)
                    .build(),
            )
        };
        Ok(Self { denied, resolver })
    }

    /// A policy that refuses nothing (tests of other parts).
    pub fn allow_all() -> Self {
        Self {
            denied: Vec::new(),
            resolver: None,
        }
    }

    /// Checks a normalised domain.
    ///
    /// # Errors
    /// The [`Refusal`] when the domain may not be asked for.
    pub async fn check(&self, domain: &str) -> Result<(), Refusal> {
        if let Some(pattern) = self.denied.iter().find(|p| p.matches(domain)) {
            return Err(Refusal::Denied(pattern.to_string()));
        }
        let Some(resolver) = &self.resolver else {
            return Ok(());
        };
        // A fully qualified name: no search domains appended.
        let lookup = tokio::time::timeout(
            RESOLVE_TIMEOUT * 2,
            resolver.lookup_ip(format!("{domain}.")),
        )
        .await;
        let addresses: Vec<IpAddr> = match lookup {
            Ok(Ok(found)) => found.iter().collect(),
            Ok(Err(e)) => {
                tracing::debug!(domain, error = %e, "egress policy: the name does not resolve here");
                return Ok(());
            }
            Err(_) => {
                tracing::debug!(domain, "egress policy: resolving timed out");
                return Ok(());
            }
        };
        if !addresses.is_empty() && addresses.iter().all(|ip| is_internal(*ip)) {
            let shown: Vec<String> = addresses.iter().take(4).map(IpAddr::to_string).collect();
            return Err(Refusal::Internal(shown.join(", ")));
        }
        Ok(())
    }
}

/// The default of `SM_DENIED_DOMAINS`: internal names and DNS services that map names to any
/// address, including private ones.
pub const DEFAULT_DENIED: &str =
    "*.internal,*.local,*.localhost,*.home.arpa,*.nip.io,*.sslip.io,*.xip.io,metadata.google.internal";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_the_suffix_and_below_it_only() {
        let p = DomainPattern::parse("*.nip.io").unwrap();
        assert!(p.matches("nip.io"));
        assert!(p.matches("10.0.0.1.nip.io"));
        assert!(!p.matches("notnip.io"));
        let single = DomainPattern::parse("*.internal").unwrap();
        assert!(single.matches("metadata.google.internal"));
        assert!(!single.matches("internal.example.com"));
        let exact = DomainPattern::parse("Metadata.Google.Internal").unwrap();
        assert_eq!(
            exact,
            DomainPattern::Exact("metadata.google.internal".into())
        );
        assert!(!exact.matches("x.metadata.google.internal"));
        assert!(DomainPattern::parse("*.exa mple.com").is_err());
        assert!(DomainPattern::parse("http://x.com").is_err());
        for p in DEFAULT_DENIED.split(',') {
            DomainPattern::parse(p).unwrap();
        }
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "151.101.0.223",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn denied_patterns_refuse_before_resolving() {
        let policy = EgressPolicy::new(
            vec![DomainPattern::parse("*.sslip.io").unwrap()],
            false,
            &[],
        )
        .unwrap();
        assert_eq!(
            policy.check("127.0.0.1.sslip.io").await,
            Err(Refusal::Denied("*.sslip.io".into()))
        );
        assert_eq!(policy.check("pypi.org").await, Ok(()));
    }
}
