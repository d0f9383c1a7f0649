//! DNS queries from any local process: the private DNS answer path on
//! arbitrary bytes, over UDP (size limits, truncation) and TCP, against an
//! index with members, aliases and override hostnames.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlib::dns::{handle, Authority, Reply, Transport};
use meshlib::ist::config::parse_toml;
use meshlib::ist::table::IstTable;
use meshlib::keys::PrivateKey;
use meshlib::names::NameIndex;
use meshlib::netmap::{Member, NetworkMap};

fn index() -> &'static NameIndex {
    static INDEX: OnceLock<NameIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut map = NetworkMap::new(
            "pn-ad0fd6a1-d05e-40ea-bf63-c4f8a75a9d8c".parse().unwrap(),
            "prod",
            meshlib::ipam::DEFAULT_RANGE,
        );
        map.generation = 42;
        for (i, (service, ptype)) in [
            ("api", "web"),
            ("api", "web"),
            ("api", "worker"),
            ("my db", "web"),
        ]
        .into_iter()
        .enumerate()
        {
            let member = Member {
                public_key: PrivateKey::from_bytes([i as u8 + 1; 32]).public_key(),
                ip: Ipv4Addr::new(10, 240, 0, i as u8 + 1),
                endpoints: vec![],
                service: service.into(),
                app_id: meshlib::ist::hostname_label(service)
                    .unwrap()
                    .parse()
                    .unwrap(),
                process_type: ptype.parse().unwrap(),
                index: i as u32 + 1,
                instance: format!("m-{i}").parse().unwrap(),
                runner: "r1".into(),
                ports: vec![],
                state: meshlib::netmap::MemberState::Online,
            };
            map.members.insert(member.public_key, member);
        }
        let overrides =
            parse_toml("[[ist]]\nservice = \"my db\"\nhostnames = [\"db.mysql.local\"]\n").unwrap();
        NameIndex::build(&map, &IstTable::build(map.services(), &overrides))
    })
}

fuzz_target!(|data: &[u8]| {
    let authority = Authority {
        ttl: 30,
        address: Some([127, 0, 0, 77].into()),
    };
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Reply::Respond(r) = handle(data, index(), &authority, transport) {
            assert!(r.bytes.len() >= 12, "a response has a header");
            if transport == Transport::Udp {
                assert!(r.bytes.len() <= 1232, "UDP answers fit 1232 bytes");
            }
            assert_eq!(r.bytes[..2], data[..2], "the query's id");
        }
    }
    let _ = meshlib::dns::servfail_for(data);
});
