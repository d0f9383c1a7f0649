//! The engine's service-address state ([`Vips`]): the range, the flow
//! table and the wake hook, which the packet loops ([`super::vip`]) use.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use ipnet::Ipv4Net;
use parking_lot::{Mutex, RwLock};

use super::flows::FlowTable;

/// A range no address falls in (network 1, mask 0).
const NO_RANGE: u64 = 1 << 32;

/// The engine's service-address state.
pub(crate) struct Vips {
    /// The service range as `network << 32 | mask` ([`NO_RANGE`]: none),
    /// read on every packet.
    range: AtomicU64,
    /// The flow table.
    pub table: Mutex<FlowTable>,
    /// Packets to or from a service address the table cannot read
    /// (later fragments, other protocols, truncated headers): dropped.
    pub unreadable: AtomicU64,
    /// Called with a service's name when a held flow asks for a wake.
    pub hook: RwLock<Option<super::WakeHook>>,
}

impl Vips {
    pub fn new(now: Instant) -> Self {
        Self {
            range: AtomicU64::new(NO_RANGE),
            table: Mutex::new(FlowTable::new(now)),
            unreadable: AtomicU64::new(0),
            hook: RwLock::new(None),
        }
    }

    /// Asks for a wake of `service` (no lock held by the caller).
    pub fn wake(&self, service: &str) {
        let hook = self.hook.read().clone();
        if let Some(h) = hook {
            h(service);
        }
    }

    /// Routes `range` through the flow table (`None`: nothing).
    pub fn set_range(&self, range: Option<Ipv4Net>) {
        let v = range.map_or(NO_RANGE, |r| {
            (u64::from(u32::from(r.network())) << 32) | u64::from(u32::from(r.netmask()))
        });
        self.range.store(v, Relaxed);
    }

    /// Whether `ip` is in the service range.
    pub fn covers(&self, ip: Ipv4Addr) -> bool {
        let v = self.range.load(Relaxed);
        u32::from(ip) & (v as u32) == (v >> 32) as u32
    }
}
