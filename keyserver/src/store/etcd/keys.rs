//! The key layout under the keyserver's prefix, and the records' stored
//! form (JSON, the same as the embedded store's). Pure: no I/O.
//!
//! | key (after the prefix) | value |
//! |---|---|
//! | `networks/<uuid>` | [`NetworkRecord`] |
//! | `members/<uuid>/<public key, hex>` | [`MemberRecord`] |
//! | `tokens/<SHA-256 of the secret, hex>` | [`TokenRecord`] |
//! | `quarantine/<uuid>/<IPv4>` | Unix seconds until the address is free |
//! | `log/<uuid>/<generation, 20 digits>` | [`LogRecord`] (the delta ending there) |
//! | `api-tokens/<SHA-256 of the secret, hex>` | [`crate::auth::ApiTokenRecord`] |
//! | `audit/<sequence, 20 digits>` | [`crate::auth::AuditRecord`] |
//! | `replicas/<replica id>` | [`ReplicaInfo`] (under the replica's lease) |
//! | `presence/<uuid>/<public key, hex>` | id of the replica holding the member's session (under its lease) |
//! | `identity` | [`IdentityRecord`]: the QUIC certificate and key, the admin token and the relay secret every replica uses |

use std::net::{Ipv4Addr, SocketAddr};

use meshlib::ids::NetworkId;
use meshlib::keys::PublicKey;
use serde::{Deserialize, Serialize};

use crate::registry::{LogRecord, MemberRecord, NetworkRecord, StoreOp, TokenRecord};
use crate::store::Stored;

/// What a live replica tells the others (`replicas/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// QUIC addresses of the replica, as written into join tokens.
    pub advertise: Vec<SocketAddr>,
    /// The relay's UDP address members are told, when this replica has one
    /// (its own relay, or the `relay-advertise` it was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<SocketAddr>,
    /// The relay over TLS on this replica's TCP port, if it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_tcp: Option<SocketAddr>,
}

/// A key this store does not write records under, but follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// A live replica.
    Replica(String),
    /// A member's session is held by a replica.
    Presence(NetworkId, PublicKey),
}

/// What a key under the prefix holds.
#[derive(Debug, Clone, PartialEq, Eq)]
// Short-lived, one at a time: boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Decoded {
    /// A record, as the op that sets it (a put, or a delete when absent).
    Record(StoreOp),
    /// A replica or presence key.
    Side(Side),
    /// The shared identity ([`IDENTITY`]): read once at start.
    Ignored,
}

/// Key of the identity every replica shares: the QUIC certificate and key
/// (tokens pin one fingerprint for all replicas) and the admin token.
pub const IDENTITY: &str = "identity";

/// The stored form of the shared identity (DER and token as base64url).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The QUIC certificate (DER, base64url).
    pub cert: String,
    /// Its private key (PKCS#8 DER, base64url).
    pub key: String,
    /// The admin API bearer token.
    pub admin_token: String,
    /// The relay ticket secret (32 bytes, base64url): a ticket one replica
    /// signs is good at every replica's relay. Absent in identities stored
    /// before it was shared; the first replica that finds it missing adds
    /// its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_secret: Option<String>,
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    meshlib::proto::hex(bytes)
}

fn unhex32(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 64 {
        return Err(format!("{text:?} is not 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{text:?} is not hex"))?;
    }
    Ok(out)
}

fn net(text: &str) -> Result<NetworkId, String> {
    let uuid = uuid::Uuid::try_parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    format!("pn-{uuid}").parse().map_err(|e| format!("{e}"))
}

/// `networks/<uuid>`.
pub fn network(id: &NetworkId) -> String {
    format!("networks/{}", id.uuid())
}

/// `members/<uuid>/`: every member of a network.
pub fn members_of(id: &NetworkId) -> String {
    format!("members/{}/", id.uuid())
}

/// `log/<uuid>/`: a network's change log.
pub fn log_of(id: &NetworkId) -> String {
    format!("log/{}/", id.uuid())
}

/// `services/<uuid>/`: a network's service groups (by name).
pub fn services_of(id: &NetworkId) -> String {
    format!("services/{}/", id.uuid())
}

/// `quarantine/<uuid>/`: a network's quarantined addresses.
pub fn quarantine_of(id: &NetworkId) -> String {
    format!("quarantine/{}/", id.uuid())
}

/// `presence/<uuid>/<key>`.
pub fn presence(id: &NetworkId, key: &PublicKey) -> String {
    format!("presence/{}/{}", id.uuid(), hex(key.as_bytes()))
}

/// `replicas/<id>`.
pub fn replica(id: &str) -> String {
    format!("replicas/{id}")
}

/// The key an op writes and the value it writes there (`None`: a delete).
pub fn encode(op: &StoreOp) -> Result<(String, Option<Vec<u8>>), String> {
    let json = |v: &dyn erased::Ser| v.json();
    Ok(match op {
        StoreOp::PutNetwork(n) => (network(&n.id), Some(json(n)?)),
        StoreOp::DeleteNetwork(id) => (network(id), None),
        StoreOp::PutToken(t) => (format!("tokens/{}", hex(&t.hash)), Some(json(t)?)),
        StoreOp::DeleteToken(h) => (format!("tokens/{}", hex(h)), None),
        StoreOp::PutMember(m) => (
            format!(
                "{}{}",
                members_of(&m.network),
                hex(m.member.public_key.as_bytes())
            ),
            Some(json(m)?),
        ),
        StoreOp::DeleteMember(id, key) => {
            (format!("{}{}", members_of(id), hex(key.as_bytes())), None)
        }
        StoreOp::PutQuarantine(id, ip, until) => (
            format!("{}{ip}", quarantine_of(id)),
            Some(until.to_string().into_bytes()),
        ),
        StoreOp::DeleteQuarantine(id, ip) => (format!("{}{ip}", quarantine_of(id)), None),
        StoreOp::PutLog(rec) => (
            format!("{}{:020}", log_of(&rec.network), rec.delta.to),
            Some(json(rec)?),
        ),
        StoreOp::DeleteLog(id, to) => (format!("{}{to:020}", log_of(id)), None),
        StoreOp::PutService(r) => (
            format!("{}{}", services_of(&r.network), r.group.name),
            Some(json(r)?),
        ),
        StoreOp::DeleteService(id, name) => (format!("{}{name}", services_of(id)), None),
        StoreOp::PutApiToken(t) => (format!("api-tokens/{}", hex(&t.hash)), Some(json(t)?)),
        StoreOp::DeleteApiToken(h) => (format!("api-tokens/{}", hex(h)), None),
        StoreOp::PutAudit(e) => (format!("audit/{:020}", e.seq), Some(json(e)?)),
        StoreOp::DeleteAudit(seq) => (format!("audit/{seq:020}"), None),
    })
}

/// Small object-safe JSON encoding, so [`encode`] stays one match.
mod erased {
    pub trait Ser {
        fn json(&self) -> Result<Vec<u8>, String>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> Result<Vec<u8>, String> {
            serde_json::to_vec(self).map_err(|e| e.to_string())
        }
    }
}

/// What the key `key` (after the prefix) with `value` (`None`: deleted)
/// means. A value that does not decode, or whose content contradicts its
/// key (a record of another network or member filed there), is an error:
/// the caller reports and skips it.
pub fn decode(key: &str, value: Option<&[u8]>) -> Result<Decoded, String> {
    let parts: Vec<&str> = key.split('/').collect();
    let record = |op| Ok(Decoded::Record(op));
    match parts.as_slice() {
        ["networks", uuid] => {
            let id = net(uuid)?;
            match value {
                None => record(StoreOp::DeleteNetwork(id)),
                Some(v) => {
                    let rec = NetworkRecord::decode(v)?;
                    if rec.id != id {
                        return Err(format!("network {} filed under {key}", rec.id));
                    }
                    record(StoreOp::PutNetwork(rec))
                }
            }
        }
        ["members", uuid, pk] => {
            let id = net(uuid)?;
            let pk = PublicKey::from_bytes(unhex32(pk)?);
            match value {
                None => record(StoreOp::DeleteMember(id, pk)),
                Some(v) => {
                    let rec = MemberRecord::decode(v)?;
                    if rec.network != id || rec.member.public_key != pk {
                        return Err(format!(
                            "member {} of {} filed under {key}",
                            rec.member.public_key, rec.network
                        ));
                    }
                    record(StoreOp::PutMember(rec))
                }
            }
        }
        ["tokens", hash] => {
            let hash = unhex32(hash)?;
            match value {
                None => record(StoreOp::DeleteToken(hash)),
                Some(v) => {
                    let rec = TokenRecord::decode(v)?;
                    if rec.hash != hash {
                        return Err(format!("token {} filed under {key}", rec.id));
                    }
                    record(StoreOp::PutToken(rec))
                }
            }
        }
        ["quarantine", uuid, ip] => {
            let id = net(uuid)?;
            let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
            match value {
                None => record(StoreOp::DeleteQuarantine(id, ip)),
                Some(v) => {
                    let until = std::str::from_utf8(v)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .ok_or("not a number of seconds")?;
                    record(StoreOp::PutQuarantine(id, ip, until))
                }
            }
        }
        ["log", uuid, to] => {
            let id = net(uuid)?;
            let to: u64 = to.parse().map_err(|e| format!("{to:?}: {e}"))?;
            match value {
                None => record(StoreOp::DeleteLog(id, to)),
                Some(v) => {
                    let rec: LogRecord = serde_json::from_slice(v).map_err(|e| e.to_string())?;
                    if rec.network != id || rec.delta.to != to || rec.delta.from >= to {
                        return Err(format!(
                            "change-log entry {}→{} filed under {key}",
                            rec.delta.from, rec.delta.to
                        ));
                    }
                    record(StoreOp::PutLog(rec))
                }
            }
        }
        ["services", uuid, name] => {
            let id = net(uuid)?;
            let name: meshlib::services::GroupName =
                name.parse().map_err(|e| format!("{name:?}: {e}"))?;
            match value {
                None => record(StoreOp::DeleteService(id, name)),
                Some(v) => {
                    let rec: crate::registry::ServiceRecord =
                        serde_json::from_slice(v).map_err(|e| e.to_string())?;
                    if rec.network != id || rec.group.name != name {
                        return Err(format!(
                            "service group {} filed under {key}",
                            rec.group.name
                        ));
                    }
                    record(StoreOp::PutService(rec))
                }
            }
        }
        ["api-tokens", hash] => {
            let hash = unhex32(hash)?;
            match value {
                None => record(StoreOp::DeleteApiToken(hash)),
                Some(v) => {
                    let rec: crate::auth::ApiTokenRecord =
                        serde_json::from_slice(v).map_err(|e| e.to_string())?;
                    if rec.hash != hash {
                        return Err(format!("API token {} filed under {key}", rec.id));
                    }
                    record(StoreOp::PutApiToken(rec))
                }
            }
        }
        ["audit", seq] => {
            let seq: u64 = seq.parse().map_err(|e| format!("{seq:?}: {e}"))?;
            match value {
                None => record(StoreOp::DeleteAudit(seq)),
                Some(v) => {
                    let rec: crate::auth::AuditRecord =
                        serde_json::from_slice(v).map_err(|e| e.to_string())?;
                    if rec.seq != seq {
                        return Err(format!("audit entry {} filed under {key}", rec.seq));
                    }
                    record(StoreOp::PutAudit(rec))
                }
            }
        }
        ["identity"] => Ok(Decoded::Ignored),
        ["replicas", id] if !id.is_empty() => Ok(Decoded::Side(Side::Replica((*id).to_owned()))),
        ["presence", uuid, pk] => Ok(Decoded::Side(Side::Presence(
            net(uuid)?,
            PublicKey::from_bytes(unhex32(pk)?),
        ))),
        _ => Err("not a key of the keyserver's layout".into()),
    }
}

/// The end of the range of every key starting with `prefix` (etcd's
/// `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MemberRecord;

    #[test]
    fn every_record_round_trips_through_its_key() {
        let id: NetworkId = format!("pn-{}", uuid::Uuid::new_v4()).parse().unwrap();
        let ip: Ipv4Addr = "10.240.0.9".parse().unwrap();
        for op in [
            StoreOp::DeleteNetwork(id),
            StoreOp::DeleteToken([7; 32]),
            StoreOp::DeleteMember(id, PublicKey::from_bytes([9; 32])),
            StoreOp::PutQuarantine(id, ip, 1234),
            StoreOp::DeleteQuarantine(id, ip),
            StoreOp::DeleteLog(id, 42),
            StoreOp::DeleteApiToken([3; 32]),
            StoreOp::DeleteAudit(77),
        ] {
            let (key, value) = encode(&op).unwrap();
            assert_eq!(decode(&key, value.as_deref()).unwrap(), Decoded::Record(op));
        }
    }

    #[test]
    fn malformed_and_foreign_values_are_errors_not_panics() {
        let id: NetworkId = format!("pn-{}", uuid::Uuid::new_v4()).parse().unwrap();
        let k = format!("members/{}/{}", id.uuid(), "ab".repeat(32));
        assert!(decode(&k, Some(b"{not json")).is_err());
        assert!(decode(&k, Some(b"\x00\xff")).is_err());
        assert!(decode("members/x/y", Some(b"{}")).is_err());
        assert!(decode("somebody/else", Some(b"hello")).is_err());
        assert!(decode("", None).is_err());
        assert!(decode(&format!("quarantine/{}/10.0.0.1", id.uuid()), Some(b"soon")).is_err());
        assert!(decode(&format!("log/{}/7", id.uuid()), Some(b"[]")).is_err());
        let _unused: Option<MemberRecord> = None;
        assert_eq!(prefix_end(b"/ist/"), b"/ist0".to_vec());
    }
}
