//! Per-client-IP token buckets (governor's GCRA) and the client IP rules.
//!
//! The client is the socket peer. `X-Forwarded-For` is believed only when the peer is one of
//! `SM_TRUSTED_PROXIES`, and then only up to the first address that is not a trusted proxy
//! (walking from the right, as each proxy appends the address it saw), so a client cannot pick
//! its own bucket by sending the header itself.
//!
//! Buckets of clients that have been idle long enough to be full again are indistinguishable
//! from fresh ones; [`ClientRateLimiter::sweep`] drops them, so memory follows the number of
//! recently active clients, not every address ever seen.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

/// Keyed rate limiter over client IPs. `C` is the clock (a fake one in tests).
pub struct ClientRateLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    trusted: Vec<IpNet>,
}

impl ClientRateLimiter<DefaultClock> {
    /// `rps` requests per second sustained, `burst` at once, per client IP.
    pub fn new(rps: NonZeroU32, burst: NonZeroU32, trusted_proxies: Vec<IpNet>) -> Self {
        Self::with_clock(rps, burst, trusted_proxies, DefaultClock::default())
    }
}

impl<C: Clock + Clone> ClientRateLimiter<C> {
    /// Like [`ClientRateLimiter::new`] with an explicit clock.
    pub fn with_clock(
        rps: NonZeroU32,
        burst: NonZeroU32,
        trusted_proxies: Vec<IpNet>,
        clock: C,
    ) -> Self {
        let quota = Quota::per_second(rps).allow_burst(burst);
        Self {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            trusted: trusted_proxies,
        }
    }

    /// Takes one token from `client`'s bucket.
    ///
    /// # Errors
    /// The time until the next token, when the bucket is empty.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// The client a request counts against (see the module documentation).
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.ip().to_canonical();
        if !self.is_trusted(client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.into_iter().rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.is_trusted(ip) {
                        break;
                    }
                }
                // Garbage from further left cannot be attributed: stay with the last proxy.
                None => break,
            }
        }
        client
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Drops the buckets of clients idle long enough to be full again and releases memory.
    /// Returns how many clients are still tracked.
    pub fn sweep(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }

    /// How many clients are tracked now.
    pub fn tracked_clients(&self) -> usize {
        self.limiter.len()
    }
}

/// One `X-Forwarded-For` element: an IP, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().expect("header value"));
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 40000)
    }

    #[test]
    fn burst_then_refusal_with_wait_time() {
        let clock = FakeRelativeClock::default();
        let rl = ClientRateLimiter::with_clock(nz(2), nz(3), vec![], clock.clone());
        let ip: IpAddr = "10.1.1.1".parse().expect("ip");
        for _ in 0..3 {
            assert!(rl.check(ip).is_ok());
        }
        let wait = rl.check(ip).expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        clock.advance(Duration::from_millis(500));
        assert!(rl.check(ip).is_ok(), "one token back after 1/rps");
        assert!(
            rl.check("10.1.1.2".parse().expect("ip")).is_ok(),
            "other clients unaffected"
        );
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let rl = ClientRateLimiter::new(nz(1), nz(1), vec!["10.0.0.0/8".parse().expect("net")]);
        let h = headers(&["203.0.113.9"]);
        assert_eq!(
            rl.client_ip(peer("198.51.100.7"), &h),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn forwarded_for_walks_back_through_trusted_proxies_only() {
        let rl = ClientRateLimiter::new(nz(1), nz(1), vec!["10.0.0.0/8".parse().expect("net")]);
        // client spoofs 1.1.1.1; real client 203.0.113.9 reached proxy 10.0.0.2, then 10.0.0.1.
        let h = headers(&["1.1.1.1, 203.0.113.9", "10.0.0.2"]);
        assert_eq!(
            rl.client_ip(peer("10.0.0.1"), &h),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        // Ports and IPv6 brackets are understood; garbage stops the walk at the last proxy.
        let h = headers(&["[2001:db8::1]:443"]);
        assert_eq!(
            rl.client_ip(peer("10.0.0.1"), &h),
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
        let h = headers(&["not-an-ip, 10.0.0.3"]);
        assert_eq!(
            rl.client_ip(peer("10.0.0.1"), &h),
            "10.0.0.3".parse::<IpAddr>().expect("ip")
        );
        // No header: the proxy itself.
        assert_eq!(
            rl.client_ip(peer("10.0.0.1"), &HeaderMap::new()),
            "10.0.0.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn ipv4_mapped_peers_share_the_ipv4_bucket() {
        let rl = ClientRateLimiter::new(nz(1), nz(1), vec![]);
        assert_eq!(
            rl.client_ip(peer("::ffff:192.0.2.1"), &HeaderMap::new()),
            "192.0.2.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn idle_buckets_are_swept() {
        let clock = FakeRelativeClock::default();
        let rl = ClientRateLimiter::with_clock(nz(10), nz(20), vec![], clock.clone());
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(rl.check(ip).is_ok());
        }
        assert_eq!(rl.tracked_clients(), 10_000);
        // Still draining: nothing may be dropped yet.
        assert_eq!(rl.sweep(), 10_000);
        // A full bucket refills in burst/rps = 2 s; after that every bucket is as good as new.
        clock.advance(Duration::from_secs(3));
        let busy: IpAddr = "192.0.2.77".parse().expect("ip");
        assert!(rl.check(busy).is_ok());
        assert_eq!(rl.sweep(), 1, "only the recently active client stays");
    }
}
