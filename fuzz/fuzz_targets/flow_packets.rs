//! Clear-text packets to and from service addresses: what a local client
//! sends into the TUN, and what a peer (any peer, hostile) sends back as a
//! service address. The input is a sequence of packets, each behind a
//! one-byte header (its direction and the peer it comes from) and a
//! two-byte length; they drive one flow table on a virtual clock. None may
//! panic; every answer written for the client must read back as a packet
//! of the same flow.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshlib::keys::PrivateKey;
use meshlib::wg::flows::{wire, Backend, FlowTable, Segment, ServiceBackends, Services};

fuzz_target!(|data: &[u8]| {
    let keys: Vec<_> = (1u8..=3)
        .map(|n| PrivateKey::from_bytes([n; 32]).public_key())
        .collect();
    let backends = keys[..2]
        .iter()
        .enumerate()
        .map(|(i, k)| Backend {
            key: *k,
            instance: format!("api-{i}").parse().unwrap(),
            ip: Ipv4Addr::new(10, 240, 0, 2 + i as u8),
            ports: if i == 0 { vec![80] } else { vec![] },
        })
        .collect();
    let services = Services {
        range: Some("10.240.4.0/22".parse().unwrap()),
        addresses: vec![ServiceBackends {
            service: "api".into(),
            ip: Ipv4Addr::new(10, 240, 4, 1),
            backends,
            wake_timeout: Some(Duration::from_secs(2)),
        }],
    };
    // The same address asleep: new flows are held for a wake.
    let mut asleep = services.clone();
    asleep.addresses[0].backends.clear();
    let start = Instant::now();
    let mut now = start;
    let mut table = FlowTable::with_limit(start, 64);
    table.set_services(&services, now);
    let mut answer = [0u8; wire::ANSWER_MAX];
    let mut rest = data;
    while rest.len() >= 3 {
        let head = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let packet = &rest[3..3 + len];
        rest = &rest[3 + len..];
        now += Duration::from_millis(u64::from(head >> 4) * 250);
        match head & 0x0f {
            0 => {
                if let Some(seg) = Segment::outbound(packet) {
                    let _ = table.outbound(&seg, packet, now);
                }
                if let Some(n) = wire::reject(packet, &mut answer) {
                    let back = Segment::inbound(&answer[..n]).expect("answers parse");
                    let sent = Segment::outbound(packet).expect("answered packets parse");
                    assert_eq!(back.key, sent.key);
                }
            }
            1..=3 => {
                if let Some(seg) = Segment::inbound(packet) {
                    let _ = table.inbound(&keys[usize::from(head & 0x0f) - 1], &seg, now);
                }
            }
            4 => {
                table.expire(now);
            }
            6 => {
                let _ = table.set_services(&asleep, now);
            }
            5 => {
                for e in table.set_services(&services, now) {
                    let n = wire::reset(&e.key, e.seq, &mut answer);
                    assert_eq!(Segment::inbound(&answer[..n]).map(|s| s.key), Some(e.key));
                }
            }
            _ => {
                let _ = table.set_services(&Services::default(), now);
            }
        }
        // Held flows released go to a backend; refused ones are answered
        // as packets of their own flow.
        let held = table.take_held();
        for (k, packets) in &held.released {
            assert!(keys[..2].contains(k));
            assert!(!packets.is_empty() && packets.len() <= 4);
        }
        for p in &held.refused {
            if let Some(n) = wire::reject(p, &mut answer) {
                let back = Segment::inbound(&answer[..n]).expect("answers parse");
                assert_eq!(Some(back.key), Segment::outbound(p).map(|s| s.key));
            }
        }
        assert!(table.stats().held <= meshlib::wg::flows::HOLD_FLOWS_PER_ADDRESS);
    }
    let _ = table.stats();
});
