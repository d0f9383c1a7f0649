//! The stored form of records: JSON (a field added later reads from older
//! records with its default), and the first releases' postcard layout,
//! still read ([`legacy`]).

use super::{db, StoreError};

/// Decodes a stored record: JSON, or the first releases' postcard layout.
pub(crate) trait Stored: serde::de::DeserializeOwned {
    /// Decodes the postcard layout of the first releases.
    fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error>;

    /// Decodes either form.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.first() == Some(&b'{') {
            serde_json::from_slice(bytes).map_err(|e| e.to_string())
        } else {
            Self::legacy(bytes).map_err(|e| e.to_string())
        }
    }
}

/// The stored (JSON) form of a record.
pub(crate) fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(db)
}

/// The records of the first releases (postcard, before member lifecycle),
/// read once and rewritten as JSON with their next change.
pub mod legacy {
    use ipnet::Ipv4Net;
    use meshlib::ids::{AppId, InstanceName, NetworkId, ProcessType};
    use meshlib::keys::PublicKey;
    use meshlib::netmap::{Member, MemberState};
    use serde::Deserialize;

    use super::Stored;
    use crate::registry::{MemberRecord, NetworkRecord, TokenRecord};

    #[derive(Deserialize)]
    struct NetworkV1 {
        id: NetworkId,
        name: String,
        range: Ipv4Net,
        generation: u64,
        created: u64,
    }

    #[derive(Deserialize)]
    struct MemberV1 {
        public_key: PublicKey,
        ip: std::net::Ipv4Addr,
        endpoints: Vec<std::net::SocketAddr>,
        service: String,
        app_id: AppId,
        process_type: ProcessType,
        index: u32,
        instance: InstanceName,
        runner: String,
        ports: Vec<u16>,
    }

    #[derive(Deserialize)]
    struct MemberRecordV1 {
        network: NetworkId,
        member: MemberV1,
        credential_hash: [u8; 32],
        joined: u64,
        last_seen: u64,
    }

    impl Stored for NetworkRecord {
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            let v: NetworkV1 = postcard::from_bytes(bytes)?;
            Ok(NetworkRecord {
                id: v.id,
                name: v.name,
                range: v.range,
                generation: v.generation,
                created: v.created,
                expire_after: None,
                service_range: None,
                addresses: Default::default(),
                tenant: None,
            })
        }
    }

    impl Stored for MemberRecord {
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            let v: MemberRecordV1 = postcard::from_bytes(bytes)?;
            let m = v.member;
            Ok(MemberRecord {
                network: v.network,
                member: Member {
                    public_key: m.public_key,
                    ip: m.ip,
                    endpoints: m.endpoints,
                    service: m.service,
                    app_id: m.app_id,
                    process_type: m.process_type,
                    index: m.index,
                    instance: m.instance,
                    runner: m.runner,
                    ports: m.ports,
                    state: MemberState::Online,
                },
                credential_hash: v.credential_hash,
                joined: v.joined,
                last_seen: v.last_seen,
                offline_since: None,
                previous_keys: vec![],
                token_hash: None,
                // Whatever happened before, only the credential resumes it.
                credential_used: true,
                ephemeral: false,
            })
        }
    }

    #[derive(Deserialize)]
    struct TokenV1 {
        id: String,
        hash: [u8; 32],
        network: NetworkId,
        uses_left: u32,
        expires: u64,
        service: Option<String>,
        process_type: Option<ProcessType>,
        created: u64,
    }

    impl Stored for TokenRecord {
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            let v: TokenV1 = postcard::from_bytes(bytes)?;
            Ok(TokenRecord {
                id: v.id,
                hash: v.hash,
                network: v.network,
                uses_left: v.uses_left,
                expires: v.expires,
                service: v.service,
                process_type: v.process_type,
                created: v.created,
                service_group: None,
                ephemeral: false,
            })
        }
    }

    impl Stored for crate::registry::ServiceRecord {
        // Service groups were never stored as postcard.
        fn legacy(bytes: &[u8]) -> Result<Self, postcard::Error> {
            postcard::from_bytes(bytes)
        }
    }
}
