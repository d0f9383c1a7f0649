//! Pure helpers of userspace mode: the loopback address that stands for a
//! remote member, the listening sockets of `/proc/net/tcp{,6}` (with their
//! inodes, to tell whose they are), and the bits of `/proc/<pid>/…` that
//! say which process owns a socket and which processes are its children.
//! The sidecar reads the files; these functions only parse text.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most ports a member announces (the keyserver's limit).
pub const MAX_ANNOUNCED: usize = 64;

/// First octets of the loopback addresses standing for remote members.
pub const LOOPBACK_PREFIX: [u8; 2] = [127, 77];

/// The loopback address on which the sidecar listens for the member at
/// `overlay` (`127.77.<third>.<fourth>` of its IPv4 address; for IPv6, the
/// last two bytes). Deterministic, so every output agrees without a table;
/// unique inside any network up to a /16.
pub fn loopback_for(overlay: IpAddr) -> Ipv4Addr {
    loopback_in(LOOPBACK_PREFIX[1], overlay)
}

/// [`loopback_for`] in `127.<second>.0.0/16` instead of `127.77.0.0/16`:
/// several userspace sidecars on one host (one per network, or a demo) each
/// take their own `second` so their listeners never collide.
pub fn loopback_in(second: u8, overlay: IpAddr) -> Ipv4Addr {
    let [c, d] = match overlay {
        IpAddr::V4(a) => {
            let o = a.octets();
            [o[2], o[3]]
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[14], o[15]]
        }
    };
    Ipv4Addr::new(LOOPBACK_PREFIX[0], second, c, d)
}

/// The TCP ports on which something listens and that a relay to
/// `127.0.0.1` reaches: `LISTEN` sockets bound to 127.0.0.1, 0.0.0.0, ::1 or
/// `::`, from the text of `/proc/net/tcp` and `/proc/net/tcp6` (give both,
/// concatenated or one after the other). Lines that do not parse are
/// skipped.
pub fn listening_ports(proc_net_tcp: &str) -> BTreeSet<u16> {
    proc_net_tcp.lines().filter_map(listening_port).collect()
}

/// `/proc/net/tcp` state code of a listening socket.
const TCP_LISTEN: &str = "0A";

/// A listening TCP socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    /// The address it is bound to (`0.0.0.0` / `::` for any).
    pub addr: IpAddr,
    /// Its port.
    pub port: u16,
    /// The socket's inode (what `/proc/<pid>/fd/*` links name as
    /// `socket:[<inode>]`).
    pub inode: u64,
}

impl Listener {
    /// Whether a connection to `target` on this socket's port reaches it:
    /// bound to `target` itself or to the unspecified address of its family
    /// (`::` also takes IPv4 unless `IPV6_V6ONLY`, assumed off as is the
    /// Linux default).
    pub fn reachable_from(&self, target: IpAddr) -> bool {
        self.addr == target
            || match self.addr {
                IpAddr::V4(a) => a.is_unspecified() && target.is_ipv4(),
                IpAddr::V6(a) => a.is_unspecified(),
            }
    }
}

/// Every `LISTEN` socket in the text of `/proc/net/tcp` and/or
/// `/proc/net/tcp6`, in file order. Lines that do not parse are skipped.
pub fn listeners(proc_net_tcp: &str) -> Vec<Listener> {
    proc_net_tcp.lines().filter_map(listener).collect()
}

/// One `/proc/net/tcp{,6}` line: `sl local rem st tx:rx tr:when retrnsmt
/// uid timeout inode ...`, the address as hex words in host byte order.
fn listener(line: &str) -> Option<Listener> {
    let f: Vec<&str> = line.split_whitespace().take(10).collect();
    if f.len() < 10 || f[3] != TCP_LISTEN {
        return None;
    }
    let (addr, port) = f[1].split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok().filter(|p| *p != 0)?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let addr = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    let inode = f[9].parse().ok()?;
    Some(Listener { addr, port, inode })
}

/// The inode of a `/proc/<pid>/fd/<n>` link text `socket:[<inode>]`;
/// `None` for any other file.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The pids of `/proc/<pid>/task/<tid>/children` (space-separated).
pub fn children(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_whitespace().filter_map(|p| p.parse().ok())
}

/// The parent pid in the text of `/proc/<pid>/stat` (`pid (comm) state
/// ppid ...`; `comm` may hold spaces and parentheses, so fields are counted
/// after the last `)`).
pub fn stat_ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// One `/proc/net/tcp{,6}` line: `sl local_address rem_address st ...`,
/// addresses as hex `ADDR:PORT` (the address in host byte order words).
fn listening_port(line: &str) -> Option<u16> {
    let mut fields = line.split_whitespace();
    let _sl = fields.next()?;
    let local = fields.next()?;
    let _remote = fields.next()?;
    if fields.next()? != TCP_LISTEN {
        return None;
    }
    let (addr, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let reachable = match addr.len() {
        // 127.0.0.1 and 0.0.0.0 (little-endian words on x86 and arm).
        8 => matches!(addr, "0100007F" | "00000000"),
        // ::1 and ::
        32 => {
            addr == "00000000000000000000000001000000" || addr == "00000000000000000000000000000000"
        }
        _ => false,
    };
    (reachable && port != 0).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_follow_the_overlay_address() {
        assert_eq!(
            loopback_for("10.240.3.7".parse().unwrap()),
            Ipv4Addr::new(127, 77, 3, 7)
        );
        assert_ne!(
            loopback_for("10.240.0.2".parse().unwrap()),
            loopback_for("10.240.1.2".parse().unwrap())
        );
        assert_eq!(
            loopback_in(78, "10.240.1.2".parse().unwrap()),
            Ipv4Addr::new(127, 78, 1, 2)
        );
        assert_eq!(
            loopback_for("fd00::1:2".parse().unwrap()),
            Ipv4Addr::new(127, 77, 0, 2)
        );
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0500000A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F91 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1770 00000000000000000000000000000000:0000 0A 0
   1: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 0
   2: 000080FE00000000FF005450B6AD1DFE:0051 00000000000000000000000000000000:0000 0A 0
";

    #[test]
    fn only_listening_sockets_reachable_on_loopback_count() {
        let ports = listening_ports(&format!("{TCP}{TCP6}"));
        // 8080 on 127.0.0.1, 22 on any, 6000 on ::1, 3000 on ::; not 80 on
        // 10.0.0.5, not the established 8081, not the link-local 81.
        assert_eq!(
            ports.into_iter().collect::<Vec<_>>(),
            vec![22, 3000, 6000, 8080]
        );
    }

    #[test]
    fn garbage_is_skipped() {
        assert!(listening_ports("x\n0: zz:zz 0 0A\n1: 0100007F:XYZ 0:0 0A\n\u{0}").is_empty());
        assert!(listeners("x\n0: zz:zz 0 0A\n1: 0100007F:XYZ 0:0 0A\n\u{0}").is_empty());
        assert!(listeners(TCP6).is_empty(), "no inode column");
    }

    #[test]
    fn listeners_carry_address_and_inode() {
        let l = listeners(TCP);
        let v4 = |a: [u8; 4]| IpAddr::V4(a.into());
        assert_eq!(
            l,
            [
                Listener {
                    addr: v4([127, 0, 0, 1]),
                    port: 8080,
                    inode: 1
                },
                Listener {
                    addr: v4([0, 0, 0, 0]),
                    port: 22,
                    inode: 2
                },
                Listener {
                    addr: v4([10, 0, 0, 5]),
                    port: 80,
                    inode: 3
                },
            ]
        );
        let local = v4([127, 0, 0, 1]);
        assert!(l[0].reachable_from(local) && l[1].reachable_from(local));
        assert!(!l[2].reachable_from(local));
        let six = "   0: 00000000000000000000000001000000:1770 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1\n   1: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4243 1\n";
        let l6 = listeners(six);
        assert_eq!(l6[0].addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!((l6[0].port, l6[0].inode), (6000, 4242));
        assert!(l6[1].reachable_from(local), ":: takes IPv4 too");
        assert!(!l6[0].reachable_from(local));
    }

    #[test]
    fn proc_bits() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(children("12 34 \n").collect::<Vec<_>>(), [12, 34]);
        assert_eq!(stat_ppid("42 (my (odd) prog) S 7 42 42 0"), Some(7));
        assert_eq!(stat_ppid("garbage"), None);
    }
}
