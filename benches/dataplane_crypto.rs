//! Per-packet cost of the data plane's crypto: encapsulate and decapsulate
//! of one packet through an established `boringtun::noise::Tunn` pair, by
//! packet size. Run: `cargo bench --bench dataplane_crypto`.

use boringtun::noise::{Tunn, TunnResult};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use x25519_dalek::{PublicKey, StaticSecret};

/// Two tunnels with a completed handshake (initiator, responder).
fn pair() -> (Tunn, Tunn) {
    let (ka, kb) = (
        StaticSecret::random_from_rng(rand_core::OsRng),
        StaticSecret::random_from_rng(rand_core::OsRng),
    );
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1, None);
    let mut b = Tunn::new(kb, pa, None, None, 2, None);
    let mut buf_a = vec![0u8; 2048];
    let mut buf_b = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf_a, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf_b) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no response"),
    };
    let keepalive = match a.decapsulate(None, &resp, &mut buf_a) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive"),
    };
    assert!(matches!(
        b.decapsulate(None, &keepalive, &mut buf_b),
        TunnResult::Done
    ));
    (a, b)
}

/// An IPv4 packet of `len` bytes from 10.240.0.1 to 10.240.0.2.
fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 240, 0, 1]);
    p[16..20].copy_from_slice(&[10, 240, 0, 2]);
    p
}

fn bench(c: &mut Criterion) {
    let (mut a, mut b) = pair();
    let mut group = c.benchmark_group("dataplane");
    for size in [64usize, 512, 1420] {
        let packet = ipv4_packet(size);
        let mut out = vec![0u8; size + 64];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encapsulate", size), &size, |bench, _| {
            bench.iter(|| match a.encapsulate(&packet, &mut out) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => 0,
            })
        });
        // Each sealed packet decrypts once (replay protection): seal
        // `iters` fresh ones untimed, then time decrypting them.
        let mut clear = vec![0u8; size + 64];
        group.bench_with_input(BenchmarkId::new("decapsulate", size), &size, |bench, _| {
            bench.iter_custom(|iters| {
                let sealed: Vec<Vec<u8>> = (0..iters)
                    .filter_map(|_| match a.encapsulate(&packet, &mut out) {
                        TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                        _ => None,
                    })
                    .collect();
                let start = std::time::Instant::now();
                for d in &sealed {
                    let r = b.decapsulate(None, d, &mut clear);
                    assert!(matches!(r, TunnResult::WriteToTunnelV4(..)));
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
