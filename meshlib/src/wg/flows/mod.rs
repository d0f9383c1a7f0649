//! Service addresses in kernel mode (pure): the per-flow table that sends
//! each new flow to a service address to one online, healthy instance of
//! the service and keeps every later packet of that flow there.
//!
//! The engine ([`super::Engine::set_services`]) asks this table about
//! every clear-text packet whose destination (from the interface) or source
//! (from a peer) is in the network's service range. No socket, no clock:
//! every method takes `now`.
//!
//! ## Policy
//!
//! - **A flow** is a TCP connection (a SYN opens it), a UDP 5-tuple, or an
//!   ICMP echo identifier, from a local client to a service address
//!   ([`FlowKey`]). Its packets go to the instance it was pinned to,
//!   unchanged: the destination stays the service address (no NAT), and
//!   the instance, which holds that address on its own interface, answers
//!   from it.
//! - **Choosing an instance**: [`crate::balance::Pool`], the policy the
//!   gateway uses (least active flows, in turn among equals, a backoff
//!   after a failure), one pool per (service address, transport, port
//!   class), with no connection limit; a flow counts as active until it
//!   ends or is closed both ways (FIN, FIN). The instances are the service's
//!   online members [`NetworkMap::backends`] lists; an instance serves a
//!   port if it announces it ([`crate::netmap::Member::ports`]) or
//!   announces none. Nothing eligible: the flow is refused at once (TCP
//!   reset, ICMP port unreachable for UDP, nothing for a ping).
//! - **Health**: a SYN answered by a reset (connection refused), or
//!   retransmitted by the client after [`SYN_RETRY_AFTER`] without an
//!   answer, or unanswered for [`SYN_TIMEOUT`], is a failure
//!   ([`crate::balance::Pool::failed`]: the instance gets no new flow of
//!   that port for 1 s, doubling up to 30 s). The flow moves to another
//!   eligible instance if there is one: the refusal is then not passed on,
//!   and the client's next SYN goes to the new instance; with none, the
//!   reset reaches the client (and an unanswered SYN keeps its instance).
//!   An answered SYN (SYN-ACK) makes its instance healthy again at once.
//!   A UDP flow answered by port unreachable is a failure too, and ends.
//! - **Replies**: a packet from a peer whose source is a service address is
//!   accepted only for a flow pinned to that very peer; any other is
//!   dropped and counted ([`FlowStats::foreign`]): a member of another
//!   service, or of this one for a flow that went elsewhere, cannot answer
//!   as the address.
//! - **A map change** takes effect at once: instances that are no longer
//!   backends get no new flow, and their flows end: open TCP flows with a
//!   reset the engine writes to the local client ([`Ended`]), half-open
//!   ones silently (the client's retransmitted SYN is a new flow), UDP and
//!   ICMP ones silently.
//! - **A TCP segment without a flow** (expired, or from before a restart)
//!   is answered with a reset, so no connection hangs on a flow the table
//!   forgot.
//! - **Expiry**, idle time since the last packet either way: TCP half-open
//!   [`TCP_SYN_IDLE`] (30 s), open [`TCP_OPEN_IDLE`] (2 h 5 min, past
//!   Linux's 2 h keepalive), closing (FIN both ways) [`TCP_CLOSING`]
//!   (10 s), reset at once; UDP [`UDP_IDLE`] (60 s); ICMP [`ICMP_IDLE`]
//!   (30 s). The driver sweeps once a second.
//! - **Bound**: at most [`MAX_FLOWS`] flows (114 688; 6.4 MB of hash
//!   table at the bound, about 64 bytes a flow at 100 000). When full, a
//!   sweep of expired flows runs (at most every 100 ms); if it frees
//!   nothing, the new flow is refused as above and counted
//!   ([`FlowStats::full`]); flows already in the table are never evicted.
//!   A pool counts at most 65 535 flows per instance (the `u16` limits of
//!   [`crate::balance::Pool`]; as many as the client has ports), then
//!   balances over the others or refuses.
//! - **Held for a wake** (scale to zero, seed 001): a new flow to a
//!   wakeable address ([`ServiceBackends::wake_timeout`]) with no online
//!   instance at all is not refused: its first packets are held
//!   ([`Outbound::Hold`]; at most [`HOLD_PACKETS`] packets and
//!   [`HOLD_FLOW_BYTES`] bytes a flow, more are dropped, a retransmitted
//!   SYN among them) and one wake is asked for the address
//!   (`Hold { wake: true }`: again only for a flow held after the wake
//!   timeout since the last ask). At most [`HOLD_FLOWS_PER_ADDRESS`] flows
//!   and [`HOLD_BYTES_PER_ADDRESS`] bytes are held per address, and
//!   [`HOLD_FLOWS`] flows and [`HOLD_BYTES`] bytes in all (1 MiB and the
//!   held flows' small records); past them a new flow is refused as above
//!   and counted ([`FlowStats::hold_full`]). A map with an eligible
//!   instance pins each held flow to one (the same policy) and hands its
//!   packets, in order, to the engine ([`FlowTable::take_held`]). A flow
//!   still held after the wake timeout is refused (TCP reset, ICMP port
//!   unreachable) by the driver's sweep of held flows
//!   ([`FlowTable::expire_held`], every 100 ms in the engine;
//!   [`FlowStats::wake_timeouts`]); so is every
//!   held flow of an address that goes away or stops being wakeable.
//! - **Traffic per destination service** ([`FlowTable::traffic`],
//!   [`crate::traffic::TrafficReport`]): flows opened (a TCP SYN-ACK seen,
//!   a datagram flow sent on), open now (held ones included), refused,
//!   held; bytes each way (clear-text IP packets); connect time (first
//!   packet to the first answer, a wake included). Kept per service
//!   address slot (at most [`crate::traffic::MAX_PAIRS`] services; no
//!   allocation per packet), cumulative since the table was made.
//! - **Not handled**: IPv4 fragments after the first (dropped: they carry
//!   no ports), IPv6.
//!
//! Calls: [`FlowTable::set_services`] on every map, [`FlowTable::outbound`]
//! for packets from the interface, [`FlowTable::inbound`] for packets from
//! peers, [`FlowTable::expire`] once a second, [`FlowTable::take_held`]
//! after both; [`FlowTable::touch`] and [`FlowTable::touch_in`] let a
//! driver that passed a run of plain packets of one flow without asking
//! record it.

pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::balance::{Admit, Pool};
use crate::ids::InstanceName;
use crate::keys::PublicKey;
use crate::netmap::{default_service_range, NetworkMap};
use crate::services::Limits;
use crate::traffic::{PairTraffic, TrafficCounters, TrafficReport, MAX_PAIRS};

pub use wire::{FlowKey, Kind, Proto, Segment};

/// Most flows in the table: 7/8 of 2^17, so its hash table never grows
/// past 2^17 buckets (49 bytes each: 6.4 MB).
pub const MAX_FLOWS: usize = 114_688;
/// A TCP flow whose SYN was not answered, idle this long, ends.
pub const TCP_SYN_IDLE: Duration = Duration::from_secs(30);
/// An open TCP flow idle this long ends (longer than the 2 h of Linux's
/// default keepalive, so a connection with keepalive on never does).
pub const TCP_OPEN_IDLE: Duration = Duration::from_secs(2 * 3600 + 300);
/// A TCP flow closed both ways (FIN, FIN) ends this long after its last packet.
pub const TCP_CLOSING: Duration = Duration::from_secs(10);
/// A UDP flow idle this long ends.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// An ICMP echo flow idle this long ends.
pub const ICMP_IDLE: Duration = Duration::from_secs(30);
/// A SYN retransmitted this long after the flow's first one, with no
/// answer yet, means the instance did not answer (Linux's first
/// retransmission comes after 1 s; an earlier copy is a duplicate).
pub const SYN_RETRY_AFTER: Duration = Duration::from_millis(500);
/// A SYN unanswered this long is a failure of its instance (checked by
/// the sweep, for clients that give up before retransmitting).
pub const SYN_TIMEOUT: Duration = Duration::from_secs(3);
/// Most packets held for one flow while its service wakes (a client
/// sends one SYN, or a few datagrams, before it hears back).
pub const HOLD_PACKETS: usize = 4;
/// Most bytes held for one flow.
pub const HOLD_FLOW_BYTES: usize = 8 * 1024;
/// Most flows held for one service address.
pub const HOLD_FLOWS_PER_ADDRESS: usize = 256;
/// Most bytes held for one service address.
pub const HOLD_BYTES_PER_ADDRESS: usize = 256 * 1024;
/// Most flows held in all.
pub const HOLD_FLOWS: usize = 1024;
/// Most bytes held in all.
pub const HOLD_BYTES: usize = 1024 * 1024;
/// Least time between two sweeps forced by a full table.
const FULL_SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Service addresses do not limit connections: only health and balance.
const NO_LIMITS: Limits = Limits {
    soft_limit: u16::MAX,
    hard_limit: u16::MAX,
};

/// One instance a service address may send flows to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Its WireGuard public key: the peer its flows are sent to.
    pub key: PublicKey,
    /// Its instance name (the pool's identity for it).
    pub instance: InstanceName,
    /// Its member address.
    pub ip: Ipv4Addr,
    /// The ports it announces; empty: any port.
    pub ports: Vec<u16>,
}

/// One service address and the instances it balances over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBackends {
    /// The service's name (for logs).
    pub service: String,
    /// The service address.
    pub ip: Ipv4Addr,
    /// Its online instances, other than this member.
    pub backends: Vec<Backend>,
    /// Scale to zero: with no instance, a new flow is held this long
    /// while the service is woken (`None`: refused at once).
    pub wake_timeout: Option<Duration>,
}

/// What the flow table balances: the service range and every service
/// address with its instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Services {
    /// The network's service range (`None`: no service addresses).
    pub range: Option<Ipv4Net>,
    /// The service addresses inside it.
    pub addresses: Vec<ServiceBackends>,
}

impl Services {
    /// The services of `map` as member `own` sees them: every service
    /// address with [`NetworkMap::backends`] other than `own` itself.
    /// Addresses outside the service range are left out.
    pub fn from_map(map: &NetworkMap, own: &PublicKey) -> Self {
        let Some(range) = map
            .service_range
            .or_else(|| default_service_range(map.range))
        else {
            return Self::default();
        };
        if map.addresses.is_empty() {
            return Self::default();
        }
        let own_ip = map.members.get(own).map(|m| m.ip);
        let addresses = map
            .addresses
            .values()
            .filter(|a| range.contains(&a.ip))
            .map(|a| ServiceBackends {
                service: a.service.clone(),
                ip: a.ip,
                backends: map
                    .backends(&a.service)
                    .into_iter()
                    .filter(|m| &m.public_key != own && Some(m.ip) != own_ip)
                    .map(|m| Backend {
                        key: m.public_key,
                        instance: m.instance.clone(),
                        ip: m.ip,
                        ports: m.ports.clone(),
                    })
                    .collect(),
                wake_timeout: a
                    .wake_timeout_secs
                    .map(|s| Duration::from_secs(u64::from(s.max(1)))),
            })
            .collect();
        Self {
            range: Some(range),
            addresses,
        }
    }
}

/// The service address member `own_ip` answers for, to hold on its own
/// interface: its service's, while it is one of the instances that
/// address balances over ([`NetworkMap::backends`], counting the member
/// itself as online: it is running).
pub fn own_address(map: &NetworkMap, own_ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let me = map.members.values().find(|m| m.ip == own_ip)?;
    let address = map.addresses.get(&me.service)?.ip;
    let mut view = map.clone();
    for m in view.members.values_mut().filter(|m| m.ip == own_ip) {
        m.state = crate::netmap::MemberState::Online;
    }
    let serves = view.backends(&me.service).iter().any(|m| m.ip == own_ip);
    serves.then_some(address)
}

/// What to do with a packet from the local client to a service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Send it to this peer.
    Forward(PublicKey),
    /// Refuse it: answer the client with [`wire::reject`].
    Reject,
    /// Drop it.
    Drop,
    /// The table took it (held while the service wakes, or a copy of a
    /// held packet dropped); `wake`: ask for a wake of the address's
    /// service ([`FlowTable::held_service`] names it).
    Hold {
        /// Ask for a wake now.
        wake: bool,
    },
}

/// What to do with a packet from a peer whose source is a service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Write it to the interface.
    Accept,
    /// Drop it: the table took it in (a refusal it moved the flow away
    /// from), nothing is wrong.
    Drop,
    /// Drop it and count it: no flow of this peer (a spoofed answer).
    Foreign,
}

/// A TCP flow a map change ended: the engine writes [`wire::reset`] of
/// `key` at `seq` to the local client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The flow.
    pub key: FlowKey,
    /// The client's last acknowledgment: the sequence its reset needs.
    pub seq: u32,
}

/// Counters of the flow table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flows in the table now, held ones included.
    pub active: usize,
    /// Flows opened (pinned to an instance).
    pub opened: u64,
    /// New flows refused: no eligible instance (none online, none serving
    /// the port, all backing off).
    pub rejected: u64,
    /// New flows refused: the table was full.
    pub full: u64,
    /// SYNs refused or unanswered by their instance (health failures).
    pub failures: u64,
    /// Flows moved to another instance after such a failure.
    pub repinned: u64,
    /// Open TCP flows reset because their instance stopped being a backend.
    pub reset: u64,
    /// Packets from a peer as a service address for no flow of that peer.
    pub foreign: u64,
    /// Flows ended by idle expiry.
    pub expired: u64,
    /// Flows held now while their service wakes (in `active` too).
    pub held: usize,
    /// Flows ever held while their service woke.
    pub held_total: u64,
    /// Held flows refused: still no instance after the wake timeout, or
    /// the address went away or stopped being wakeable.
    pub wake_timeouts: u64,
    /// New flows refused: the hold bounds were reached.
    pub hold_full: u64,
    /// Bytes of packets held now.
    pub held_bytes: usize,
    /// Packets to or from a service address that could not be read (later
    /// fragments, other protocols, truncated headers): dropped. Counted by
    /// the engine ([`super::Engine::flow_stats`]).
    pub unreadable: u64,
}

/// TCP progress of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN sent, no SYN-ACK yet.
    SynSent,
    /// SYN-ACK seen.
    Open,
    /// FIN both ways.
    Closing,
    /// UDP or ICMP.
    Datagram,
}

/// The flow holds a slot of its pool (released when it ends).
const HOLDS_SLOT: u8 = 1;
/// The client sent a FIN.
const FIN_CLIENT: u8 = 2;
/// The service sent a FIN.
const FIN_SERVICE: u8 = 4;
/// The flow's SYN was counted as a failure already.
const SYN_FAILED: u8 = 8;
/// The flow moved after a refusal: the client's next SYN is the first
/// its new instance sees.
const AWAIT_SYN: u8 = 16;
/// `ack` holds an acknowledgment the client sent.
const HAS_ACK: u8 = 32;
/// The flow's connect time was measured (its first answer seen).
const ANSWERED: u8 = 64;

/// One flow: where it goes and what was seen of it. Times are
/// milliseconds since the table's epoch, wrapping (the sweep ends every
/// flow long before a wrap).
#[derive(Debug, Clone, Copy)]
struct Flow {
    backend: u32,
    pool: u32,
    last: u32,
    since: u32,
    /// When its first packet was seen (held ones included).
    start: u32,
    isn: u32,
    ack: u32,
    state: State,
    bits: u8,
}

/// Which instances of a service address a pool covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    /// Every instance (ICMP echo).
    All,
    /// A port some instance announces: those announcing it or none.
    Port(u16),
    /// Any other port: the instances announcing none.
    Unlisted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PoolKey {
    service: Ipv4Addr,
    proto: Proto,
    class: Class,
}

#[derive(Debug)]
struct PoolSlot {
    key: PoolKey,
    pool: Pool,
    /// Backend slots it covers.
    members: Vec<u32>,
    /// The traffic counters of its service ([`NO_COUNTER`]: none).
    counter: u32,
}

/// No traffic counters (more services than [`MAX_PAIRS`]).
const NO_COUNTER: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BackendSlot {
    service: Ipv4Addr,
    b: Backend,
}

#[derive(Debug)]
struct Address {
    /// Ports some instance announces.
    announced: BTreeSet<u16>,
    /// Pool slots by (transport, class).
    pools: HashMap<(Proto, Class), u32>,
    /// The service's name.
    service: String,
    /// Wake timeout, ms (`None`: not wakeable).
    wake: Option<u32>,
    /// Whether it has no instance at all (new flows are held if wakeable).
    idle: bool,
    /// Its traffic counters.
    counter: u32,
}

/// A flow held while its service wakes.
#[derive(Debug)]
struct Held {
    /// When it was held (ms).
    since: u32,
    /// Its SYN's sequence number (TCP).
    isn: u32,
    /// Its packets, in order.
    packets: Vec<Vec<u8>>,
    /// Their bytes.
    bytes: usize,
}

/// The flows held for one service address.
#[derive(Debug)]
struct Hold {
    flows: HashMap<FlowKey, Held>,
    /// Their bytes.
    bytes: usize,
    /// The service's traffic counters.
    counter: u32,
}

/// What held flows became, for the engine to act on
/// ([`FlowTable::take_held`]).
#[derive(Debug, Default)]
pub struct HeldOutput {
    /// Flows pinned to an instance: send these packets, in order, to
    /// this peer.
    pub released: Vec<(PublicKey, Vec<Vec<u8>>)>,
    /// Flows refused: answer each first packet with [`wire::reject`].
    pub refused: Vec<Vec<u8>>,
}

impl HeldOutput {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.released.is_empty() && self.refused.is_empty()
    }
}

/// The flow table. See the module docs for the policy.
#[derive(Debug)]
pub struct FlowTable {
    epoch: Instant,
    limit: usize,
    addresses: HashMap<Ipv4Addr, Address>,
    pools: Vec<PoolSlot>,
    backends: Vec<BackendSlot>,
    flows: HashMap<FlowKey, Flow>,
    stats: FlowStats,
    /// When a full table was last swept (ms).
    full_sweep: Option<u32>,
    /// The services last applied (most maps change none of them).
    applied: Services,
    /// Flows held while their service wakes, by service address.
    holds: HashMap<Ipv4Addr, Hold>,
    /// When a wake was last asked, by service address (ms).
    asked: HashMap<Ipv4Addr, u32>,
    /// Held flows and bytes over every address.
    held_flows: usize,
    held_bytes: usize,
    /// What held flows became, not yet taken by the engine.
    held_out: HeldOutput,
    /// Traffic per destination service (slots never freed: cumulative).
    traffic: Vec<(String, TrafficCounters)>,
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX)) as u32
}

impl FlowTable {
    /// An empty table holding at most [`MAX_FLOWS`] flows; `now` is its epoch.
    pub fn new(now: Instant) -> Self {
        Self::with_limit(now, MAX_FLOWS)
    }

    /// An empty table holding at most `limit` flows.
    pub fn with_limit(now: Instant, limit: usize) -> Self {
        Self {
            epoch: now,
            limit,
            addresses: HashMap::new(),
            pools: Vec::new(),
            backends: Vec::new(),
            flows: HashMap::new(),
            stats: FlowStats::default(),
            full_sweep: None,
            applied: Services::default(),
            holds: HashMap::new(),
            asked: HashMap::new(),
            held_flows: 0,
            held_bytes: 0,
            held_out: HeldOutput::default(),
            traffic: Vec::new(),
        }
    }

    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// The counters.
    pub fn stats(&self) -> FlowStats {
        FlowStats {
            active: self.flows.len() + self.held_flows,
            held: self.held_flows,
            held_bytes: self.held_bytes,
            ..self.stats
        }
    }

    /// Bytes the table's flows take on the heap (capacity included):
    /// what [`MAX_FLOWS`] costs.
    pub fn flow_bytes(&self) -> usize {
        // hashbrown: one entry and one control byte per bucket; at most
        // 7/8 of the buckets are used.
        let per = std::mem::size_of::<(FlowKey, Flow)>() + 1;
        let buckets = (self.flows.capacity() * 8).div_ceil(7).next_power_of_two();
        buckets * per
    }
}

mod table;

#[cfg(test)]
mod tests;
