//! Clear-text IPv4 packets as the flow table sees them (pure): which flow
//! a packet belongs to ([`Segment::outbound`], [`Segment::inbound`]), and
//! the answers the engine writes to its own interface for the local client
//! ([`reject`]: a TCP reset or an ICMP port unreachable; [`reset`]: a TCP
//! reset for a flow whose backend left). Every parser checks every length:
//! packets from peers are hostile.

use std::net::Ipv4Addr;

/// TCP flag FIN.
pub const FIN: u8 = 0x01;
/// TCP flag SYN.
pub const SYN: u8 = 0x02;
/// TCP flag RST.
pub const RST: u8 = 0x04;
/// TCP flag ACK.
pub const ACK: u8 = 0x10;

/// Bytes of the original packet an ICMP error quotes at most (with the
/// 28-byte IP and ICMP headers in front: 576, as RFC 1812 asks).
const QUOTE: usize = 548;

/// Room an answer ([`reject`], [`reset`]) needs in the caller's buffer.
pub const ANSWER_MAX: usize = 20 + 8 + QUOTE;

/// The transport of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// ICMP echo (ping): the flow is the echo identifier.
    Icmp,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A flow, always in the client → service address direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The local client's address (this member's).
    pub client: Ipv4Addr,
    /// The service address.
    pub service: Ipv4Addr,
    /// The client's port (TCP, UDP), or the echo identifier (ICMP).
    pub client_port: u16,
    /// The service port (TCP, UDP); 0 for ICMP.
    pub service_port: u16,
    /// The transport.
    pub proto: Proto,
}

/// What a packet is, beyond its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP segment.
    Tcp {
        /// Its flags ([`SYN`], [`ACK`], [`FIN`], [`RST`], ...).
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number (meaningful with [`ACK`]).
        ack: u32,
        /// Payload bytes.
        len: u32,
    },
    /// A UDP datagram.
    Udp,
    /// An ICMP echo request (from the client) or reply (from the service).
    Echo,
    /// An ICMP error (unreachable, time exceeded, parameter problem) about a
    /// packet of the flow: its [`Segment::key`] is the quoted packet's flow.
    IcmpError {
        /// ICMP type.
        kind: u8,
        /// ICMP code.
        code: u8,
    },
}

/// A clear-text packet of a flow to or from a service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The flow, in the client → service direction.
    pub key: FlowKey,
    /// What the packet is.
    pub kind: Kind,
    /// The packet's length in bytes (for the traffic counters).
    pub len: u32,
}

/// The fields of an IPv4 header the parsers need.
struct Ip<'a> {
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// The transport header and payload (up to the total length).
    l4: &'a [u8],
    /// Fragment offset is not 0: no transport header.
    later_fragment: bool,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn addr(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

/// Parses an IPv4 header; `quoted`: the packet is inside an ICMP error, so
/// it may be cut short (its total length is not checked).
fn ip(p: &[u8], quoted: bool) -> Option<Ip<'_>> {
    let first = *p.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || p.len() < ihl {
        return None;
    }
    let end = if quoted {
        p.len()
    } else {
        let total = usize::from(be16(p, 2)?);
        if total < ihl || total > p.len() {
            return None;
        }
        total
    };
    Some(Ip {
        proto: p[9],
        src: addr(p, 12)?,
        dst: addr(p, 16)?,
        l4: &p[ihl..end],
        later_fragment: be16(p, 6)? & 0x1fff != 0,
    })
}

/// Ports (or the echo identifier), protocol and [`Kind`] of a transport
/// header, with `src`/`dst` as the packet has them; `None` for what the
/// flow table does not handle (other protocols, ICMP other than echo and
/// errors, truncated headers).
fn transport(ip: &Ip<'_>, quoted: bool) -> Option<(Proto, u16, u16, Kind)> {
    if ip.later_fragment {
        return None;
    }
    let l4 = ip.l4;
    match ip.proto {
        6 => {
            let (sport, dport) = (be16(l4, 0)?, be16(l4, 2)?);
            if quoted {
                // The quote holds 8 bytes of the header at least: ports
                // and sequence number.
                let seq = be32(l4, 4)?;
                let kind = Kind::Tcp {
                    flags: 0,
                    seq,
                    ack: 0,
                    len: 0,
                };
                return Some((Proto::Tcp, sport, dport, kind));
            }
            let doff = usize::from(*l4.get(12)? >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return None;
            }
            let kind = Kind::Tcp {
                flags: l4[13],
                seq: be32(l4, 4)?,
                ack: be32(l4, 8)?,
                len: (l4.len() - doff) as u32,
            };
            Some((Proto::Tcp, sport, dport, kind))
        }
        17 => Some((Proto::Udp, be16(l4, 0)?, be16(l4, 2)?, Kind::Udp)),
        1 => {
            let (kind, code) = (*l4.first()?, *l4.get(1)?);
            match kind {
                0 | 8 => Some((Proto::Icmp, be16(l4, 4)?, 0, Kind::Echo)),
                3 | 11 | 12 if !quoted => Some((Proto::Icmp, 0, 0, Kind::IcmpError { kind, code })),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Segment {
    /// A packet the local client sends (source: the client, destination:
    /// a service address). An ICMP error the client sends about a packet
    /// it received from the service is keyed by that packet's flow.
    pub fn outbound(packet: &[u8]) -> Option<Segment> {
        let outer = ip(packet, false)?;
        let (proto, sport, dport, kind) = transport(&outer, false)?;
        if let Kind::IcmpError { .. } = kind {
            // The quote is a packet from the service to the client.
            let key = quoted_key(outer.l4, false)?;
            let len = packet.len() as u32;
            return (key.client == outer.src).then_some(Segment { key, kind, len });
        }
        if proto == Proto::Icmp && packet_icmp_type(outer.l4) != Some(8) {
            return None;
        }
        let key = FlowKey {
            client: outer.src,
            service: outer.dst,
            client_port: sport,
            service_port: dport,
            proto,
        };
        let len = packet.len() as u32;
        Some(Segment { key, kind, len })
    }

    /// A packet from a peer whose source is a service address (destination:
    /// the local client). An ICMP error is keyed by the flow of the packet
    /// it quotes, which must be one the client sent to that address.
    pub fn inbound(packet: &[u8]) -> Option<Segment> {
        let outer = ip(packet, false)?;
        let (proto, sport, dport, kind) = transport(&outer, false)?;
        if let Kind::IcmpError { .. } = kind {
            // The quote is a packet from the client to the service.
            let key = quoted_key(outer.l4, true)?;
            let ok = key.client == outer.dst && key.service == outer.src;
            let len = packet.len() as u32;
            return ok.then_some(Segment { key, kind, len });
        }
        if proto == Proto::Icmp && packet_icmp_type(outer.l4) != Some(0) {
            return None;
        }
        let key = FlowKey {
            client: outer.dst,
            service: outer.src,
            client_port: if proto == Proto::Icmp { sport } else { dport },
            service_port: if proto == Proto::Icmp { 0 } else { sport },
            proto,
        };
        let len = packet.len() as u32;
        Some(Segment { key, kind, len })
    }

    /// TCP flags (0 for other transports).
    pub fn tcp_flags(&self) -> u8 {
        match self.kind {
            Kind::Tcp { flags, .. } => flags,
            _ => 0,
        }
    }

    /// True for the packets the table only needs to see once per run of a
    /// flow's packets: TCP without SYN, FIN or RST, UDP, echo.
    pub fn is_plain(&self) -> bool {
        match self.kind {
            Kind::Tcp { flags, .. } => flags & (SYN | FIN | RST) == 0,
            Kind::Udp | Kind::Echo => true,
            Kind::IcmpError { .. } => false,
        }
    }
}

fn packet_icmp_type(l4: &[u8]) -> Option<u8> {
    l4.first().copied()
}

/// The flow of the packet an ICMP error quotes (after its 8-byte header):
/// `from_client`: the quoted packet went client → service, else service →
/// client (its source is then the service).
fn quoted_key(icmp: &[u8], from_client: bool) -> Option<FlowKey> {
    let inner = ip(icmp.get(8..)?, true)?;
    let (proto, sport, dport, _) = transport(&inner, true)?;
    let (client, service, cport, sport) = match (from_client, proto) {
        (true, Proto::Icmp) => (inner.src, inner.dst, sport, 0),
        (true, _) => (inner.src, inner.dst, sport, dport),
        (false, Proto::Icmp) => (inner.dst, inner.src, sport, 0),
        (false, _) => (inner.dst, inner.src, dport, sport),
    };
    Some(FlowKey {
        client,
        service,
        client_port: cport,
        service_port: sport,
        proto,
    })
}

/// One's-complement sum of `data` (as 16-bit big-endian words) onto `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes a 20-byte IPv4 header for `total` bytes of `proto` into `out`.
fn ip_header(out: &mut [u8], total: usize, proto: u8, src: Ipv4Addr, dst: Ipv4Addr) {
    out[..20].fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[6] = 0x40; // DF
    out[8] = 64;
    out[9] = proto;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum16(0, &out[..20]));
    out[10..12].copy_from_slice(&c.to_be_bytes());
}

/// A TCP segment with no payload from `key`'s service side to its client.
fn tcp_to_client(out: &mut [u8], key: &FlowKey, flags: u8, seq: u32, ack: u32) -> usize {
    ip_header(out, 40, 6, key.service, key.client);
    let t = &mut out[20..40];
    t.fill(0);
    t[0..2].copy_from_slice(&key.service_port.to_be_bytes());
    t[2..4].copy_from_slice(&key.client_port.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&key.service.octets());
    pseudo[4..8].copy_from_slice(&key.client.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = fold(sum16(sum16(0, &pseudo), t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    40
}

/// A TCP reset of flow `key`, to the client, at sequence `seq` (the last
/// acknowledgment the client sent: its next expected byte). Returns its
/// length in `out` (at least [`ANSWER_MAX`] bytes). Only TCP keys make
/// sense; the caller checks.
pub fn reset(key: &FlowKey, seq: u32, out: &mut [u8]) -> usize {
    tcp_to_client(out, key, RST, seq, 0)
}

/// The refusal of `packet`, a packet the client sent to a service address,
/// written to `out` (at least [`ANSWER_MAX`] bytes) as from that address:
/// for TCP a reset as RFC 9293 answers a segment with no connection (none
/// for a reset); for UDP an ICMP port unreachable quoting the packet; for
/// anything else nothing. Returns the answer's length.
pub fn reject(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    let seg = Segment::outbound(packet)?;
    let key = &seg.key;
    match seg.kind {
        Kind::Tcp {
            flags,
            seq,
            ack,
            len,
            ..
        } => {
            if flags & RST != 0 {
                return None;
            }
            if flags & ACK != 0 {
                return Some(tcp_to_client(out, key, RST, ack, 0));
            }
            let used = len + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
            Some(tcp_to_client(
                out,
                key,
                RST | ACK,
                0,
                seq.wrapping_add(used),
            ))
        }
        Kind::Udp => {
            let total = usize::from(be16(packet, 2)?).min(packet.len());
            let quote = &packet[..total.min(QUOTE)];
            let n = 28 + quote.len();
            ip_header(out, n, 1, key.service, key.client);
            let icmp = &mut out[20..n];
            icmp[..8].fill(0);
            icmp[0] = 3; // destination unreachable
            icmp[1] = 3; // port unreachable
            icmp[8..].copy_from_slice(quote);
            let c = fold(sum16(0, icmp));
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            Some(n)
        }
        Kind::Echo | Kind::IcmpError { .. } => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4 packet: `proto`, `src` → `dst`, transport bytes `l4`.
    pub(crate) fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + l4.len()];
        ip_header(&mut p, 20 + l4.len(), proto, src.into(), dst.into());
        p[20..].copy_from_slice(l4);
        p
    }

    /// A TCP segment (no options) with `payload` bytes of payload.
    pub(crate) fn tcp(
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        flags: u8,
        seq: u32,
        ack: u32,
        payload: usize,
    ) -> Vec<u8> {
        let mut t = vec![0u8; 20 + payload];
        t[0..2].copy_from_slice(&src.1.to_be_bytes());
        t[2..4].copy_from_slice(&dst.1.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        ipv4(6, src.0, dst.0, &t)
    }

    /// A UDP datagram with `payload` bytes.
    pub(crate) fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: usize) -> Vec<u8> {
        let mut u = vec![0u8; 8 + payload];
        u[0..2].copy_from_slice(&src.1.to_be_bytes());
        u[2..4].copy_from_slice(&dst.1.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        ipv4(17, src.0, dst.0, &u)
    }

    /// An ICMP echo request (`request`) or reply with identifier `id`.
    pub(crate) fn echo(src: [u8; 4], dst: [u8; 4], request: bool, id: u16) -> Vec<u8> {
        let mut i = vec![0u8; 16];
        i[0] = if request { 8 } else { 0 };
        i[4..6].copy_from_slice(&id.to_be_bytes());
        ipv4(1, src, dst, &i)
    }

    const C: [u8; 4] = [10, 240, 0, 9];
    const V: [u8; 4] = [10, 240, 4, 1];

    fn key(proto: Proto, cport: u16, sport: u16) -> FlowKey {
        FlowKey {
            client: C.into(),
            service: V.into(),
            client_port: cport,
            service_port: sport,
            proto,
        }
    }

    fn valid_tcp_checksum(p: &[u8]) -> bool {
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&p[12..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&((p.len() - 20) as u16).to_be_bytes());
        fold(sum16(sum16(0, &pseudo), &p[20..])) == 0 && fold(sum16(0, &p[..20])) == 0
    }

    #[test]
    fn both_directions_key_the_same_flow() {
        let out = Segment::outbound(&tcp((C, 40000), (V, 80), SYN, 7, 0, 0)).unwrap();
        assert_eq!(out.key, key(Proto::Tcp, 40000, 80));
        assert_eq!(
            out.kind,
            Kind::Tcp {
                flags: SYN,
                seq: 7,
                ack: 0,
                len: 0
            }
        );
        assert!(!out.is_plain());
        let back = Segment::inbound(&tcp((V, 80), (C, 40000), ACK, 1, 8, 100)).unwrap();
        assert_eq!(back.key, out.key);
        assert!(back.is_plain());
        let u = Segment::outbound(&udp((C, 5000), (V, 53), 10)).unwrap();
        let ur = Segment::inbound(&udp((V, 53), (C, 5000), 10)).unwrap();
        assert_eq!((u.key, ur.key), (key(Proto::Udp, 5000, 53), u.key));
        let e = Segment::outbound(&echo(C, V, true, 77)).unwrap();
        let er = Segment::inbound(&echo(V, C, false, 77)).unwrap();
        assert_eq!((e.key, er.key), (key(Proto::Icmp, 77, 0), e.key));
        // A reply type the wrong way round is not a flow packet.
        assert!(Segment::outbound(&echo(C, V, false, 77)).is_none());
        assert!(Segment::inbound(&echo(V, C, true, 77)).is_none());
    }

    #[test]
    fn icmp_errors_are_keyed_by_the_quoted_flow() {
        // The service says port unreachable about the client's datagram.
        let orig = udp((C, 5000), (V, 53), 4);
        let mut l4 = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&orig[..28]);
        let err = Segment::inbound(&ipv4(1, V, C, &l4)).unwrap();
        assert_eq!(err.key, key(Proto::Udp, 5000, 53));
        assert_eq!(err.kind, Kind::IcmpError { kind: 3, code: 3 });
        // Quoting a packet of another pair of addresses is refused.
        assert!(Segment::inbound(&ipv4(1, [10, 240, 4, 2], C, &l4)).is_none());
        // The client's kernel complains about a datagram from the service.
        let from_svc = udp((V, 53), (C, 5000), 4);
        let mut l4 = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&from_svc[..28]);
        let err = Segment::outbound(&ipv4(1, C, V, &l4)).unwrap();
        assert_eq!(err.key, key(Proto::Udp, 5000, 53));
    }

    #[test]
    fn garbage_and_fragments_are_refused_without_panic() {
        let good = tcp((C, 1), (V, 2), SYN, 0, 0, 0);
        for n in 0..good.len() {
            assert!(Segment::outbound(&good[..n]).is_none(), "cut at {n}");
            assert!(Segment::inbound(&good[..n]).is_none(), "cut at {n}");
        }
        let mut frag = udp((C, 1), (V, 2), 8);
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert!(Segment::outbound(&frag).is_none());
        let mut bad_doff = good.clone();
        bad_doff[32] = 0xf0;
        assert!(Segment::outbound(&bad_doff).is_none());
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert!(Segment::outbound(&v6).is_none());
        let mut out = [0u8; ANSWER_MAX];
        for n in 0..good.len() {
            let _ = reject(&good[..n], &mut out);
        }
    }

    #[test]
    fn rejections_follow_rfc_9293_and_quote_datagrams() {
        let mut out = [0u8; ANSWER_MAX];
        // A SYN is answered RST|ACK acknowledging the SYN.
        let n = reject(&tcp((C, 40000), (V, 80), SYN, 1000, 0, 0), &mut out).unwrap();
        let r = Segment::inbound(&out[..n]).unwrap();
        assert_eq!(r.key, key(Proto::Tcp, 40000, 80));
        assert_eq!(
            r.kind,
            Kind::Tcp {
                flags: RST | ACK,
                seq: 0,
                ack: 1001,
                len: 0
            }
        );
        assert!(valid_tcp_checksum(&out[..n]));
        // A segment with ACK is answered by a reset at its acknowledgment.
        let n = reject(&tcp((C, 40000), (V, 80), ACK, 5, 999, 10), &mut out).unwrap();
        assert_eq!(Segment::inbound(&out[..n]).unwrap().tcp_flags(), RST);
        assert_eq!(&out[24..28], &999u32.to_be_bytes());
        // Never a reset for a reset; nothing for pings.
        assert!(reject(&tcp((C, 1), (V, 2), RST, 0, 0, 0), &mut out).is_none());
        assert!(reject(&echo(C, V, true, 1), &mut out).is_none());
        // UDP: port unreachable quoting the datagram, valid checksums.
        let d = udp((C, 5000), (V, 53), 2000);
        let n = reject(&d, &mut out).unwrap();
        assert_eq!(n, 576);
        assert_eq!(fold(sum16(0, &out[20..n])), 0);
        let e = Segment::inbound(&out[..n]).unwrap();
        assert_eq!(e.key, key(Proto::Udp, 5000, 53));
        // The reset of a flow.
        let n = reset(&key(Proto::Tcp, 40000, 80), 4242, &mut out);
        assert!(valid_tcp_checksum(&out[..n]));
        let r = Segment::inbound(&out[..n]).unwrap();
        assert_eq!(r.tcp_flags(), RST);
    }
}
