//! The WireGuard cross-platform configuration protocol (UAPI), pure part:
//! parsing a `set=1` body into a [`SetRequest`] and rendering a `get=1`
//! answer from [`InterfaceInfo`]. Keys are hex, one `key=value` per line.
//! The socket server around it is [`super::uapi_server`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::keys::{PrivateKey, PublicKey};

/// `errno` of a malformed or invalid request (wireguard-go's `-EINVAL`).
pub const ERRNO_INVALID: i32 = -22;
/// `errno` when the listen port cannot be bound (wireguard-go's `-EADDRINUSE`).
pub const ERRNO_PORT_IN_USE: i32 = -98;

/// Why a `set=1` body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    /// A line is not `key=value`.
    #[error("line {0:?} is not key=value")]
    NotKeyValue(String),
    /// A key is unknown in its context (interface or peer section).
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// A value does not parse for its key.
    #[error("bad value for {key}: {value:?}")]
    BadValue {
        /// The key.
        key: String,
        /// The value (truncated).
        value: String,
    },
    /// A peer key appeared before any `public_key=` line.
    #[error("{0} before any public_key")]
    NoPeer(String),
}

impl UapiError {
    /// The `errno=` value to answer with.
    pub fn errno(&self) -> i32 {
        ERRNO_INVALID
    }
}

/// One peer section of a `set=1` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    /// The peer (`public_key=`).
    pub public_key: PublicKey,
    /// `remove=true`: delete the peer.
    pub remove: bool,
    /// `update_only=true`: do nothing if the peer does not exist.
    pub update_only: bool,
    /// `preshared_key=` (all zeros clears it).
    pub preshared_key: Option<[u8; 32]>,
    /// `endpoint=`.
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval=` in seconds (0 disables).
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true`: clear the peer's allowed IPs first.
    pub replace_allowed_ips: bool,
    /// `allowed_ip=` lines, added in order.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerChange {
    fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// A parsed `set=1` request, applied in field order.
#[derive(Clone, Default)]
pub struct SetRequest {
    /// `private_key=`: `Some(None)` clears the key (all-zero value).
    pub private_key: Option<Option<PrivateKey>>,
    /// `listen_port=`.
    pub listen_port: Option<u16>,
    /// `fwmark=` (0 clears).
    pub fwmark: Option<u32>,
    /// `replace_peers=true`: remove every peer before applying `peers`.
    pub replace_peers: bool,
    /// Peer sections, in order.
    pub peers: Vec<PeerChange>,
}

fn parse_bool(key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, value)),
    }
}

fn bad(key: &str, value: &str) -> UapiError {
    UapiError::BadValue {
        key: key.to_string(),
        value: value.chars().take(80).collect(),
    }
}

fn parse_key32(key: &str, value: &str) -> Result<[u8; 32], UapiError> {
    crate::keys::parse_hex(value).map_err(|_| bad(key, value))
}

impl SetRequest {
    /// Parses the lines after `set=1` (without the closing blank line).
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<Self, UapiError> {
        let mut req = SetRequest::default();
        for line in lines {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| UapiError::NotKeyValue(line.chars().take(80).collect()))?;
            if key == "public_key" {
                let pk = PublicKey::from_bytes(parse_key32(key, value)?);
                req.peers.push(PeerChange::new(pk));
            } else if let Some(peer) = req.peers.last_mut() {
                parse_peer_line(peer, key, value)?;
            } else {
                req.parse_interface_line(key, value)?;
            }
        }
        Ok(req)
    }

    fn parse_interface_line(&mut self, key: &str, value: &str) -> Result<(), UapiError> {
        match key {
            "private_key" => {
                let bytes = parse_key32(key, value)?;
                self.private_key = Some((bytes != [0; 32]).then(|| PrivateKey::from_bytes(bytes)));
            }
            "listen_port" => self.listen_port = Some(value.parse().map_err(|_| bad(key, value))?),
            "fwmark" => self.fwmark = Some(value.parse().map_err(|_| bad(key, value))?),
            "replace_peers" => self.replace_peers = parse_bool(key, value)?,
            "remove"
            | "update_only"
            | "endpoint"
            | "persistent_keepalive_interval"
            | "replace_allowed_ips"
            | "allowed_ip"
            | "preshared_key"
            | "protocol_version" => return Err(UapiError::NoPeer(key.to_string())),
            _ => return Err(UapiError::UnknownKey(key.chars().take(40).collect())),
        }
        Ok(())
    }
}

fn parse_peer_line(peer: &mut PeerChange, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "remove" => peer.remove = parse_bool(key, value)?,
        "update_only" => peer.update_only = parse_bool(key, value)?,
        "preshared_key" => peer.preshared_key = Some(parse_key32(key, value)?),
        "endpoint" => peer.endpoint = Some(value.parse().map_err(|_| bad(key, value))?),
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = Some(value.parse().map_err(|_| bad(key, value))?)
        }
        "replace_allowed_ips" => peer.replace_allowed_ips = parse_bool(key, value)?,
        "allowed_ip" => peer
            .allowed_ips
            .push(value.parse().map_err(|_| bad(key, value))?),
        "protocol_version" if value == "1" => {}
        "protocol_version" => return Err(bad(key, value)),
        _ => return Err(UapiError::UnknownKey(key.chars().take(40).collect())),
    }
    Ok(())
}

/// What a `get=1` answer reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// The preshared key, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Current endpoint (configured or roamed to).
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Wall-clock time of the last completed handshake.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer (datagrams, on the wire).
    pub rx_bytes: u64,
    /// Bytes sent to the peer (datagrams, on the wire).
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds (0: off).
    pub persistent_keepalive: u16,
}

/// What a `get=1` answer reports about the interface.
#[derive(Clone, Default)]
pub struct InterfaceInfo {
    /// The interface's private key, if set.
    pub private_key: Option<PrivateKey>,
    /// The bound UDP port.
    pub listen_port: u16,
    /// The firewall mark (0: none).
    pub fwmark: u32,
    /// The peers.
    pub peers: Vec<PeerInfo>,
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl InterfaceInfo {
    /// Renders the full `get=1` answer, ending with `errno=0` and a blank line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(key) = &self.private_key {
            let _ = writeln!(out, "private_key={}", hex(&key.to_bytes()));
        }
        let _ = writeln!(out, "listen_port={}", self.listen_port);
        if self.fwmark != 0 {
            let _ = writeln!(out, "fwmark={}", self.fwmark);
        }
        for p in &self.peers {
            render_peer(&mut out, p);
        }
        out.push_str("errno=0\n\n");
        out
    }
}

fn render_peer(out: &mut String, p: &PeerInfo) {
    let _ = writeln!(out, "public_key={}", p.public_key.to_hex());
    let _ = writeln!(
        out,
        "preshared_key={}",
        hex(&p.preshared_key.unwrap_or([0; 32]))
    );
    let _ = writeln!(out, "protocol_version=1");
    if let Some(ep) = p.endpoint {
        let _ = writeln!(out, "endpoint={ep}");
    }
    let since = p
        .last_handshake
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO);
    let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
    let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
    let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
    let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
    let _ = writeln!(
        out,
        "persistent_keepalive_interval={}",
        p.persistent_keepalive
    );
    for net in &p.allowed_ips {
        let _ = writeln!(out, "allowed_ip={net}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

    #[test]
    fn parses_the_xplatform_example() {
        let body = format!(
            "private_key={K1}\nlisten_port=12912\nreplace_peers=true\npublic_key={K2}\n\
             endpoint=192.0.2.5:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.240.0.2/32\nallowed_ip=fd00::/64\n\
             public_key={K1}\nremove=true"
        );
        let Ok(req) = SetRequest::parse(body.lines()) else {
            panic!("rejected");
        };
        assert_eq!(req.listen_port, Some(12912));
        assert!(req.replace_peers);
        assert!(matches!(req.private_key, Some(Some(_))));
        assert_eq!(req.peers.len(), 2);
        let p = &req.peers[0];
        assert_eq!(p.public_key.to_hex(), K2);
        assert_eq!(p.endpoint, Some("192.0.2.5:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips.len(), 2);
        assert!(req.peers[1].remove);
    }

    #[test]
    fn zero_private_key_clears() {
        let line = format!("private_key={}", "0".repeat(64));
        let Ok(req) = SetRequest::parse([line.as_str()]) else {
            panic!("rejected");
        };
        assert!(matches!(req.private_key, Some(None)));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let cases = [
            "listen_port=99999".to_string(),
            "nonsense".into(),
            "private_key=zz".into(),
            format!("private_key={}é", &K1[..62]),
            "endpoint=1.2.3.4:5".into(),
            format!("public_key={K1}\nallowed_ip=10.0.0.0/33"),
            format!("public_key={K1}\nendpoint=nowhere"),
            format!("public_key={K1}\nremove=yes"),
            format!("public_key={K1}\nbogus=1"),
            "bogus=1".into(),
        ];
        for c in cases {
            let Err(err) = SetRequest::parse(c.lines()) else {
                panic!("accepted {c:?}");
            };
            assert_eq!(err.errno(), ERRNO_INVALID, "{c}");
        }
    }

    #[test]
    fn random_input_never_panics() {
        // Deterministic xorshift; lines built from the protocol's own tokens.
        let tokens = [
            "public_key=",
            "private_key=",
            "allowed_ip=",
            "endpoint=",
            "remove=",
            "true",
            "listen_port=",
            "replace_peers=",
            "=",
            "10.240.0.1/32",
            "[::1]:51820",
            K1,
            "/",
            ":",
            "é",
            "65536",
            "-1",
            "",
            "update_only=",
            "persistent_keepalive_interval=",
            "preshared_key=",
            "protocol_version=",
            "fwmark=",
            "\0",
            "0",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..20_000 {
            let lines: Vec<String> = (0..1 + next(6))
                .map(|_| {
                    (0..1 + next(4))
                        .map(|_| tokens[next(tokens.len())])
                        .collect()
                })
                .collect();
            if let Err(e) = SetRequest::parse(lines.iter().map(String::as_str)) {
                assert_eq!(e.errno(), ERRNO_INVALID);
            }
        }
    }

    #[test]
    fn renders_get_answer() {
        let info = InterfaceInfo {
            private_key: Some(PrivateKey::from_bytes([7; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: PublicKey::from_hex(K2).unwrap(),
                preshared_key: None,
                endpoint: Some("192.0.2.9:1234".parse().unwrap()),
                allowed_ips: vec!["10.240.0.2/32".parse().unwrap()],
                last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::new(1700000000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: 25,
            }],
        };
        let text = info.render();
        assert!(text.starts_with(&format!("private_key={}\n", "07".repeat(32))));
        assert!(text.contains("listen_port=51820\n"));
        assert!(!text.contains("fwmark"));
        assert!(text.contains(&format!("public_key={K2}\n")));
        assert!(text.contains("endpoint=192.0.2.9:1234\n"));
        assert!(text.contains("last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n"));
        assert!(text.contains("tx_bytes=20\nrx_bytes=10\n"));
        assert!(text.contains("persistent_keepalive_interval=25\nallowed_ip=10.240.0.2/32\n"));
        assert!(text.ends_with("errno=0\n\n"));
    }
}
