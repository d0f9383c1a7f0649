//! The relay as a state machine without I/O: registrations, forwarding
//! decisions, rate limits and counters, and STUN answers, one datagram at a
//! time. Time is an argument. The driver ([`super::serve_udp`]) owns the
//! socket.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use meshlib::ids::NetworkId;
use meshlib::nat::relay::{self, Frame, Ticket};
use meshlib::nat::stun;
use rand_core::RngCore as _;

/// Limits of one relay (plain data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Bytes a second one member may send through the relay (token bucket).
    /// Default 12.5 MB/s (100 Mbit/s).
    pub rate: u64,
    /// The bucket's size in bytes (bursts). Default 2 MiB.
    pub burst: u64,
    /// Most registered members. Default 65536; more are not answered.
    pub max_members: usize,
    /// A registration not renewed for this long is dropped. Default 60 s
    /// (members renew every [`RelayLimits::keepalive`]).
    pub idle: Duration,
    /// How often members must renew (told in the `registered` answer).
    /// Default 15 s: keeps the NAT mapping toward the relay open too.
    pub keepalive: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            rate: 12_500_000,
            burst: 2 << 20,
            max_members: 65_536,
            idle: Duration::from_secs(60),
            keepalive: Duration::from_secs(15),
        }
    }
}

/// Counters of a relay (exported as metrics).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Registered members now.
    pub members: AtomicU64,
    /// Datagrams forwarded.
    pub forwarded_packets: AtomicU64,
    /// Bytes forwarded (payload, without relay headers).
    pub forwarded_bytes: AtomicU64,
    /// Datagrams dropped: over the sender's rate limit.
    pub dropped_rate: AtomicU64,
    /// Datagrams dropped: no member at that address in the sender's network.
    pub dropped_no_destination: AtomicU64,
    /// Datagrams dropped: from an unregistered address, or a wrong token.
    pub dropped_unregistered: AtomicU64,
    /// Registrations refused: bad, foreign or expired tickets, or full.
    pub refused_tickets: AtomicU64,
    /// STUN binding requests answered.
    pub stun_answers: AtomicU64,
    /// Datagrams the relay could not send (its socket buffer stayed full,
    /// or the destination's network was unreachable).
    pub dropped_send: AtomicU64,
}

impl RelayMetrics {
    /// The Prometheus text form.
    pub fn render(&self) -> String {
        let rows = [
            (
                "istmesh_relay_members",
                "gauge",
                "registered members",
                &self.members,
            ),
            (
                "istmesh_relay_forwarded_packets_total",
                "counter",
                "datagrams forwarded",
                &self.forwarded_packets,
            ),
            (
                "istmesh_relay_forwarded_bytes_total",
                "counter",
                "bytes forwarded",
                &self.forwarded_bytes,
            ),
            (
                "istmesh_relay_dropped_rate_limited_total",
                "counter",
                "datagrams over the sender's rate limit",
                &self.dropped_rate,
            ),
            (
                "istmesh_relay_dropped_no_destination_total",
                "counter",
                "datagrams for no member of the sender's network",
                &self.dropped_no_destination,
            ),
            (
                "istmesh_relay_dropped_unregistered_total",
                "counter",
                "datagrams from unregistered senders or with a wrong token",
                &self.dropped_unregistered,
            ),
            (
                "istmesh_relay_refused_tickets_total",
                "counter",
                "registrations refused",
                &self.refused_tickets,
            ),
            (
                "istmesh_relay_stun_answers_total",
                "counter",
                "STUN binding requests answered",
                &self.stun_answers,
            ),
            (
                "istmesh_relay_dropped_send_total",
                "counter",
                "datagrams that could not be sent (socket buffer full, destination unreachable)",
                &self.dropped_send,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Relaxed)
            ));
        }
        out
    }
}

#[derive(Debug)]
struct Session {
    network: NetworkId,
    ip: Ipv4Addr,
    token: [u8; 8],
    seen: Instant,
    /// Token bucket: bytes available, as of `filled`.
    tokens: f64,
    filled: Instant,
}

/// The relay's state.
#[derive(Debug)]
pub struct RelayCore {
    secret: [u8; 32],
    limits: RelayLimits,
    /// Registered members by their current address.
    by_addr: HashMap<SocketAddr, Session>,
    /// Their address by (network, private IP): lookups never cross networks.
    by_member: HashMap<(NetworkId, Ipv4Addr), SocketAddr>,
    /// Their address by token: a member whose NAT mapping changed keeps
    /// relaying (its token proves the registration) before it renews.
    by_token: HashMap<[u8; 8], SocketAddr>,
    last_sweep: Option<Instant>,
}

impl RelayCore {
    /// A relay that admits tickets signed with `secret`.
    pub fn new(secret: [u8; 32], limits: RelayLimits) -> Self {
        Self {
            secret,
            limits,
            by_addr: HashMap::new(),
            by_member: HashMap::new(),
            by_token: HashMap::new(),
            last_sweep: None,
        }
    }

    /// Whether `addr` holds a registration.
    pub fn is_registered(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// One datagram from `from` at `now` (`unix`: the same instant as Unix
    /// seconds, for ticket expiry). Writes the answer or the forwarded
    /// datagram into `out` and returns where it goes and its length; `None`
    /// when nothing is sent (an unknown or unauthorised sender gets nothing).
    pub fn handle(
        &mut self,
        now: Instant,
        unix: u64,
        from: SocketAddr,
        d: &[u8],
        out: &mut [u8],
        metrics: &RelayMetrics,
    ) -> Option<(SocketAddr, usize)> {
        self.sweep(now, metrics);
        if let Some(tx) = stun::parse_request(d) {
            metrics.stun_answers.fetch_add(1, Relaxed);
            return copy(out, &stun::binding_response(&tx, from)).map(|n| (from, n));
        }
        match relay::parse(d)? {
            Frame::Register(ticket) => self.register(now, unix, from, ticket, out, metrics),
            Frame::Send { dst, token, packet } => {
                self.forward(now, from, dst, token, packet, out, metrics)
            }
            _ => None,
        }
    }

    fn register(
        &mut self,
        now: Instant,
        unix: u64,
        from: SocketAddr,
        ticket: &[u8],
        out: &mut [u8],
        metrics: &RelayMetrics,
    ) -> Option<(SocketAddr, usize)> {
        let refuse = || {
            metrics.refused_tickets.fetch_add(1, Relaxed);
            None
        };
        let Ok(t) = Ticket::verify(ticket, &self.secret, unix) else {
            return refuse();
        };
        let member = (t.body.network, t.body.ip);
        // A renewal from the same address keeps its token; a new address
        // (NAT rebinding, restart) replaces the member's old one.
        let token = match self.by_addr.get_mut(&from) {
            Some(s) if (s.network, s.ip) == member => {
                s.seen = now;
                s.token
            }
            _ => {
                if self.by_addr.len() >= self.limits.max_members {
                    return refuse();
                }
                // The rate limit is the member's, not its address's: a
                // registration from a new address keeps the old bucket
                // (else re-registering from new ports would refill it).
                let mut bucket = (self.limits.burst as f64, now);
                if let Some(old) = self.by_member.remove(&member) {
                    if let Some(s) = self.by_addr.remove(&old) {
                        self.by_token.remove(&s.token);
                        bucket = (s.tokens, s.filled);
                    }
                }
                if let Some(old) = self.by_addr.remove(&from) {
                    self.by_member.remove(&(old.network, old.ip));
                    self.by_token.remove(&old.token);
                }
                let mut token = [0u8; 8];
                rand_core::OsRng.fill_bytes(&mut token);
                self.by_addr.insert(
                    from,
                    Session {
                        network: member.0,
                        ip: member.1,
                        token,
                        seen: now,
                        tokens: bucket.0,
                        filled: bucket.1,
                    },
                );
                self.by_member.insert(member, from);
                self.by_token.insert(token, from);
                tracing::debug!(network = %member.0, ip = %member.1, %from, key = %t.body.public_key, "relay: member registered");
                token
            }
        };
        metrics.members.store(self.by_addr.len() as u64, Relaxed);
        let keepalive = self.limits.keepalive.as_secs().min(u64::from(u16::MAX)) as u16;
        copy(out, &relay::registered(token, keepalive, from)).map(|n| (from, n))
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        now: Instant,
        from: SocketAddr,
        dst: Ipv4Addr,
        token: [u8; 8],
        packet: &[u8],
        out: &mut [u8],
        metrics: &RelayMetrics,
    ) -> Option<(SocketAddr, usize)> {
        if !self.by_addr.contains_key(&from) {
            self.rebind(from, token);
        }
        let Some(s) = self.by_addr.get_mut(&from) else {
            metrics.dropped_unregistered.fetch_add(1, Relaxed);
            return None;
        };
        if s.token
            .iter()
            .zip(&token)
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            != 0
        {
            metrics.dropped_unregistered.fetch_add(1, Relaxed);
            return None;
        }
        let elapsed = now.duration_since(s.filled).as_secs_f64();
        s.filled = now;
        let burst = self.limits.burst as f64;
        s.tokens = (s.tokens + elapsed * self.limits.rate as f64).min(burst);
        if s.tokens < packet.len() as f64 {
            metrics.dropped_rate.fetch_add(1, Relaxed);
            return None;
        }
        s.tokens -= packet.len() as f64;
        let (network, src) = (s.network, s.ip);
        // Only the sender's own network is looked in.
        let Some(to) = self.by_member.get(&(network, dst)).copied() else {
            metrics.dropped_no_destination.fetch_add(1, Relaxed);
            return None;
        };
        let n = relay::DELIVER_HEADER + packet.len();
        let buf = out.get_mut(..n)?;
        relay::deliver_header(buf, src);
        buf[relay::DELIVER_HEADER..].copy_from_slice(packet);
        metrics.forwarded_packets.fetch_add(1, Relaxed);
        metrics
            .forwarded_bytes
            .fetch_add(packet.len() as u64, Relaxed);
        Some((to, n))
    }

    /// A registered token from a new address: the member's NAT mapping
    /// changed; its registration moves there.
    fn rebind(&mut self, from: SocketAddr, token: [u8; 8]) {
        let Some(old) = self.by_token.get(&token).copied() else {
            return;
        };
        if let Some(s) = self.by_addr.remove(&old) {
            self.by_member.insert((s.network, s.ip), from);
            self.by_token.insert(token, from);
            self.by_addr.insert(from, s);
        }
    }

    /// Drops registrations not renewed within `idle` (once a second).
    fn sweep(&mut self, now: Instant, metrics: &RelayMetrics) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_sweep = Some(now);
        let idle = self.limits.idle;
        let gone: Vec<SocketAddr> = self
            .by_addr
            .iter()
            .filter(|(_, s)| now.duration_since(s.seen) > idle)
            .map(|(a, _)| *a)
            .collect();
        for a in gone {
            if let Some(s) = self.by_addr.remove(&a) {
                self.by_member.remove(&(s.network, s.ip));
                self.by_token.remove(&s.token);
            }
        }
        metrics.members.store(self.by_addr.len() as u64, Relaxed);
    }
}

fn copy(out: &mut [u8], bytes: &[u8]) -> Option<usize> {
    out.get_mut(..bytes.len())?.copy_from_slice(bytes);
    Some(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::keys::PrivateKey;
    use meshlib::nat::relay::TicketBody;

    const SECRET: [u8; 32] = [4; 32];

    fn ticket(network: NetworkId, ip: [u8; 4], secret: &[u8; 32]) -> Vec<u8> {
        Ticket::sign(
            secret,
            TicketBody {
                network,
                public_key: PrivateKey::generate().public_key(),
                ip: Ipv4Addr::from(ip),
                expires: 1_000,
            },
        )
        .to_bytes()
    }

    struct Rig {
        core: RelayCore,
        m: RelayMetrics,
        out: Vec<u8>,
        now: Instant,
    }

    impl Rig {
        fn new(limits: RelayLimits) -> Self {
            Self {
                core: RelayCore::new(SECRET, limits),
                m: RelayMetrics::default(),
                out: vec![0; 2048],
                now: Instant::now(),
            }
        }
        fn handle(&mut self, from: &str, d: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
            let from = from.parse().unwrap();
            self.core
                .handle(self.now, 10, from, d, &mut self.out, &self.m)
                .map(|(to, n)| (to, self.out[..n].to_vec()))
        }
        fn register(&mut self, from: &str, t: &[u8]) -> [u8; 8] {
            let (_, reply) = self.handle(from, &relay::register(t)).expect("registered");
            match relay::parse(&reply) {
                Some(Frame::Registered {
                    token, observed, ..
                }) => {
                    assert_eq!(observed.to_string(), from);
                    token
                }
                other => panic!("{other:?}"),
            }
        }
    }

    fn send(dst: [u8; 4], token: [u8; 8], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; relay::SEND_HEADER + payload.len()];
        relay::send_header(&mut f, Ipv4Addr::from(dst), token);
        f[relay::SEND_HEADER..].copy_from_slice(payload);
        f
    }

    #[test]
    fn forwards_within_a_network_only() {
        let mut r = Rig::new(RelayLimits::default());
        let (n1, n2) = (NetworkId::random(), NetworkId::random());
        let a = r.register("192.0.2.1:1000", &ticket(n1, [10, 240, 0, 1], &SECRET));
        let _b = r.register("192.0.2.2:2000", &ticket(n1, [10, 240, 0, 2], &SECRET));
        // Another network uses the very same private addresses.
        let x = r.register("192.0.2.3:3000", &ticket(n2, [10, 240, 0, 1], &SECRET));
        let (to, d) = r
            .handle("192.0.2.1:1000", &send([10, 240, 0, 2], a, b"wg"))
            .unwrap();
        assert_eq!(to, "192.0.2.2:2000".parse().unwrap());
        assert_eq!(
            relay::parse(&d),
            Some(Frame::Deliver {
                src: Ipv4Addr::new(10, 240, 0, 1),
                packet: b"wg"
            })
        );
        // x (network 2) asks for 10.240.0.2, which exists only in network 1.
        assert_eq!(
            r.handle("192.0.2.3:3000", &send([10, 240, 0, 2], x, b"wg")),
            None
        );
        assert_eq!(r.m.dropped_no_destination.load(Relaxed), 1);
        assert_eq!(r.m.forwarded_packets.load(Relaxed), 1);
    }

    #[test]
    fn strangers_and_forged_tickets_get_no_answer() {
        let mut r = Rig::new(RelayLimits::default());
        let n = NetworkId::random();
        // Signed with another secret: no answer.
        assert_eq!(
            r.handle(
                "192.0.2.9:9",
                &relay::register(&ticket(n, [10, 240, 0, 1], &[5; 32]))
            ),
            None
        );
        assert_eq!(r.handle("192.0.2.9:9", &relay::register(b"junk")), None);
        let a = r.register("192.0.2.1:1000", &ticket(n, [10, 240, 0, 1], &SECRET));
        r.register("192.0.2.2:2000", &ticket(n, [10, 240, 0, 2], &SECRET));
        // An unregistered address, or a registered one, with a wrong token.
        assert_eq!(
            r.handle("192.0.2.9:9", &send([10, 240, 0, 2], [9; 8], b"x")),
            None
        );
        assert!(r
            .handle("192.0.2.1:1000", &send([10, 240, 0, 2], a, b"x"))
            .is_some());
        assert_eq!(
            r.handle("192.0.2.1:1000", &send([10, 240, 0, 2], [0; 8], b"x")),
            None
        );
        assert_eq!(r.m.dropped_unregistered.load(Relaxed), 2);
        assert_eq!(r.m.refused_tickets.load(Relaxed), 2);
        // STUN is answered to anyone.
        let (_, resp) = r
            .handle("203.0.113.5:7", &stun::binding_request(&[1; 12]))
            .unwrap();
        assert_eq!(
            stun::parse_response(&resp).map(|(_, a)| a),
            Some("203.0.113.5:7".parse().unwrap())
        );
    }

    #[test]
    fn a_rebound_member_keeps_relaying_with_its_token() {
        let mut r = Rig::new(RelayLimits::default());
        let n = NetworkId::random();
        let a = r.register("192.0.2.1:1000", &ticket(n, [10, 240, 0, 1], &SECRET));
        let b = r.register("192.0.2.2:2000", &ticket(n, [10, 240, 0, 2], &SECRET));
        // a's NAT now maps it to another port.
        assert!(r
            .handle("192.0.2.1:1001", &send([10, 240, 0, 2], a, b"x"))
            .is_some());
        let (to, _) = r
            .handle("192.0.2.2:2000", &send([10, 240, 0, 1], b, b"y"))
            .unwrap();
        assert_eq!(to, "192.0.2.1:1001".parse().unwrap());
        // A guessed token does nothing.
        assert!(r
            .handle("192.0.2.7:7", &send([10, 240, 0, 2], [1; 8], b"z"))
            .is_none());
    }

    /// The bucket is the member's: registering its ticket again from new
    /// ports (issue 20: 280x the rate that way) does not refill it.
    #[test]
    fn re_registering_from_new_ports_does_not_refill_the_bucket() {
        let mut r = Rig::new(RelayLimits {
            rate: 1000,
            burst: 1500,
            ..RelayLimits::default()
        });
        let n = NetworkId::random();
        let t = ticket(n, [10, 240, 0, 1], &SECRET);
        r.register("192.0.2.2:2000", &ticket(n, [10, 240, 0, 2], &SECRET));
        let big = vec![0u8; 1000];
        let mut sent = 0;
        for port in 1000..1100 {
            let from = format!("192.0.2.1:{port}");
            let token = r.register(&from, &t);
            if r.handle(&from, &send([10, 240, 0, 2], token, &big))
                .is_some()
            {
                sent += 1;
            }
        }
        assert_eq!(sent, 1, "one burst's worth, however many registrations");
        assert_eq!(r.m.dropped_rate.load(Relaxed), 99);
    }

    #[test]
    fn rate_limit_and_idle_expiry() {
        let mut r = Rig::new(RelayLimits {
            rate: 1000,
            burst: 1500,
            ..RelayLimits::default()
        });
        let n = NetworkId::random();
        let a = r.register("192.0.2.1:1000", &ticket(n, [10, 240, 0, 1], &SECRET));
        r.register("192.0.2.2:2000", &ticket(n, [10, 240, 0, 2], &SECRET));
        let big = vec![0u8; 1000];
        assert!(r
            .handle("192.0.2.1:1000", &send([10, 240, 0, 2], a, &big))
            .is_some());
        assert!(r
            .handle("192.0.2.1:1000", &send([10, 240, 0, 2], a, &big))
            .is_none());
        assert_eq!(r.m.dropped_rate.load(Relaxed), 1);
        r.now += Duration::from_secs(1);
        assert!(r
            .handle("192.0.2.1:1000", &send([10, 240, 0, 2], a, &big))
            .is_some());
        // Both go quiet past `idle`: forgotten.
        r.now += Duration::from_secs(120);
        assert!(r
            .handle("192.0.2.1:1000", &send([10, 240, 0, 2], a, b"x"))
            .is_none());
        assert_eq!(r.m.members.load(Relaxed), 0);
    }
}
