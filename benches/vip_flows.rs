//! The service-address flow table at 100 000 flows: heap bytes per flow
//! (a counting allocator around the system one), the cost of opening a
//! flow, of the lookup every run of a flow's packets pays, and of the
//! once-a-second sweep (the time it holds the table's lock).
//! Run: `cargo bench --bench vip_flows`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use meshlib::keys::PrivateKey;
use meshlib::wg::flows::{Backend, FlowTable, Outbound, Segment, ServiceBackends, Services};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const FLOWS: u32 = 100_000;
const VIP: [u8; 4] = [10, 240, 4, 1];

/// A TCP SYN (or, with `ack`, a plain ACK) from flow `i` to the service.
fn segment(i: u32, ack: bool) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[9] = 6;
    // Clients 10.240.<1..>.<..>, ports 1024..: 100 000 distinct flows.
    p[12..16].copy_from_slice(&[10, 240, 1 + (i >> 24) as u8, (i >> 16) as u8]);
    p[16..20].copy_from_slice(&VIP);
    p[20..22].copy_from_slice(&(i as u16).to_be_bytes());
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = if ack { 0x10 } else { 0x02 };
    p
}

fn main() {
    let now = Instant::now();
    let backends: Vec<Backend> = (1..=4u8)
        .map(|n| Backend {
            key: PrivateKey::generate().public_key(),
            instance: format!("api-{n}").parse().unwrap(),
            ip: Ipv4Addr::new(10, 240, 0, n),
            ports: vec![],
        })
        .collect();
    let services = Services {
        range: Some("10.240.4.0/22".parse().unwrap()),
        addresses: vec![ServiceBackends {
            service: "api".into(),
            ip: VIP.into(),
            backends,
            wake_timeout: None,
        }],
    };
    let syns: Vec<Vec<u8>> = (0..FLOWS).map(|i| segment(i, false)).collect();
    let acks: Vec<Vec<u8>> = (0..FLOWS).map(|i| segment(i, true)).collect();
    let before = LIVE.load(Relaxed);
    let mut table = FlowTable::new(now);
    table.set_services(&services, now);
    let empty = LIVE.load(Relaxed);
    let start = Instant::now();
    for p in &syns {
        let seg = Segment::outbound(p).unwrap();
        assert!(matches!(table.outbound(&seg, p, now), Outbound::Forward(_)));
    }
    let open_ns = start.elapsed().as_nanos() / u128::from(FLOWS);
    let full = LIVE.load(Relaxed);
    let start = Instant::now();
    for p in &acks {
        let seg = Segment::outbound(p).unwrap();
        assert!(matches!(table.outbound(&seg, p, now), Outbound::Forward(_)));
    }
    let lookup_ns = start.elapsed().as_nanos() / u128::from(FLOWS);
    assert_eq!(table.stats().active, FLOWS as usize);
    // The once-a-second sweep (nothing expires): how long it holds the lock.
    let start = Instant::now();
    assert_eq!(table.expire(now), 0);
    let sweep = start.elapsed();
    let flows = full - empty;
    println!(
        "vip flow table: {FLOWS} flows = {:.1} MiB on the heap ({} bytes/flow; empty table with 4 instances: {} bytes); open {open_ns} ns/flow, lookup {lookup_ns} ns/packet run; sweep {sweep:?}",
        flows as f64 / (1 << 20) as f64,
        flows / FLOWS as usize,
        empty - before,
    );
}
