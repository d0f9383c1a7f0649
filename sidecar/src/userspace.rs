//! Userspace mode in the sidecar: the loopback listeners for the services
//! this instance reaches, relayed into the node's
//! [`meshlib::userspace::Stack`] (the node runs the stack and the engine).
//!
//! For every other member and every port it declares, the sidecar listens
//! (TCP and UDP) on `127.77.<c>.<d>:<port>` ([`loopback_for`](meshlib::userspace::ports::loopback_for) of the
//! member's private IP) and relays into the tunnel. The outputs (hosts, env,
//! DNS) give those loopback addresses ([`address_map`]); this member itself
//! is `127.0.0.1`. Inbound traffic reaches only the ports this member
//! serves (its own entry of the map, i.e. what its peers were told), on
//! `service-address` (`127.0.0.1` by default); the stack refuses and counts
//! the rest.
//!
//! Every service address of the map ([`meshlib::netmap::ServiceAddress`])
//! gets listeners too, on `127.<octet>.<c>.<d>` of the address
//! ([`service_address_map`]), for every port its instances announce; each
//! new connection (or UDP sender) goes to one instance, chosen and kept as
//! [`meshlib::userspace::vip`] documents (the one policy,
//! [`meshlib::balance::Pool`]; refused or silent instances skipped without
//! the client noticing). The member listeners stay: they back
//! `<instance>.internal` and the seed-003 names.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use meshlib::netmap::NetworkMap;
use meshlib::node::ControlRequests;
use meshlib::userspace::ports::loopback_in;
use meshlib::userspace::vip::{ServicePlane, VipConfig};
use meshlib::userspace::Stack;
use meshlib::wg::uapi_server::{self, UapiServerError};
use meshlib::wg::{Engine, UapiServer};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::outputs::AddressMap;

/// One relayed service: a loopback listen address and its tunnel target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Forward {
    /// Where the sidecar listens (TCP and UDP).
    pub listen: SocketAddr,
    /// The remote member's private address and port.
    pub target: SocketAddr,
}

/// The forwards `map` asks for, seen by the member at `own` (pure).
pub fn desired_forwards(map: &NetworkMap, own: Ipv4Addr, octet: u8) -> BTreeSet<Forward> {
    map.members
        .values()
        .filter(|m| m.ip != own)
        .flat_map(|m| {
            let local = IpAddr::V4(loopback_in(octet, IpAddr::V4(m.ip)));
            m.ports.iter().map(move |&p| Forward {
                listen: SocketAddr::new(local, p),
                target: SocketAddr::new(IpAddr::V4(m.ip), p),
            })
        })
        .collect()
}

/// The outputs' address for each member in userspace mode: its loopback
/// address, and `127.0.0.1` for this member (known by its private IP, which
/// a key rotation keeps).
pub fn address_map(own: Ipv4Addr, octet: u8) -> AddressMap {
    Arc::new(move |m| {
        if m.ip == own {
            Ipv4Addr::LOCALHOST
        } else {
            loopback_in(octet, IpAddr::V4(m.ip))
        }
    })
}

/// The loopback address standing for a service address in userspace mode:
/// `127.<octet>.<c>.<d>` of the service address `10.x.<c>.<d>`, where the
/// sidecar's service listeners balance over the service's instances. Pure
/// and deterministic, like [`address_map`], so hosts, env and DNS agree
/// with the listeners without a table. Service addresses come from the
/// block after the network's range, so for networks of a /17 or smaller
/// (the default /22: members on `127.<octet>.0-3.x`, service addresses on
/// `127.<octet>.4-7.x`) they never meet a member's loopback address.
pub fn service_address_map(octet: u8) -> impl Fn(Ipv4Addr) -> Ipv4Addr + Send + Sync + Clone {
    move |service_ip| loopback_in(octet, IpAddr::V4(service_ip))
}

/// Starts the UAPI server at the standard path
/// (`/var/run/wireguard/<interface>.sock`, where `wg` looks), or, when that
/// directory is not writable (no privileges), at
/// `<state-dir>/<interface>.sock`.
pub fn start_uapi(engine: Arc<Engine>, config: &Config) -> Result<UapiServer, UapiServerError> {
    let standard = uapi_server::socket_path(&config.interface);
    match UapiServer::start(engine.clone(), &standard) {
        Ok(s) => Ok(s),
        Err(UapiServerError::Bind { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            let path = config.state_dir.join(format!("{}.sock", config.interface));
            tracing::warn!(%source, path = %path.display(), "no access to the standard UAPI directory; serving UAPI in the state directory");
            UapiServer::start(engine, &path)
        }
        Err(e) => Err(e),
    }
}

/// The loopback listeners of userspace mode: one per remote member and
/// port, relayed into the stack, and the service addresses' balancing
/// listeners.
pub struct UserspacePlane {
    stack: Arc<Stack>,
    /// The second octet of the loopback addresses (`127.<octet>.c.d`).
    octet: u8,
    running: HashMap<Forward, Vec<JoinHandle<()>>>,
    /// The service addresses' listeners.
    services: ServicePlane,
}

impl UserspacePlane {
    /// Listeners relaying into `stack`.
    pub fn new(stack: Arc<Stack>, octet: u8) -> Self {
        Self {
            services: ServicePlane::new(stack.clone(), VipConfig::new(octet)),
            stack,
            octet,
            running: HashMap::new(),
        }
    }

    /// The stack (for its counters).
    pub fn stack(&self) -> Arc<Stack> {
        self.stack.clone()
    }

    /// The service addresses' listeners (for a wake hook, status, and
    /// [`ServicePlane::traffic`]: this member's traffic per destination
    /// service).
    pub fn services(&self) -> &ServicePlane {
        &self.services
    }

    /// Wires scale to zero: a connection or UDP flow held at a sleeping
    /// wakeable service address asks the node to wake the service
    /// ([`ControlRequests::wake`]: one request per service and wake timeout
    /// reaches the keyserver, which runs the hook once).
    pub fn with_control(self, requests: ControlRequests) -> Self {
        self.services.set_wake_hook(Arc::new(move |service| {
            if !requests.wake(service) {
                tracing::debug!(service, "wake request not queued (control busy)");
            }
        }));
        self
    }

    /// This member's traffic per destination service (see
    /// [`ServicePlane::traffic`]).
    pub fn traffic(&self) -> meshlib::traffic::TrafficReport {
        self.services.traffic()
    }

    /// Starts and stops loopback listeners to match `map` (its online
    /// members but `own`, and its service addresses). The node opens the
    /// served ports to the tunnel.
    pub fn apply(&mut self, map: &NetworkMap, own: Ipv4Addr) {
        self.services.apply(map, own);
        let desired = desired_forwards(&map.online(), own, self.octet);
        self.running.retain(|f, tasks| {
            let keep = desired.contains(f);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for f in desired {
            if !self.running.contains_key(&f) {
                let tasks = self.listen(f);
                self.running.insert(f, tasks);
            }
        }
    }

    /// Binds `f.listen` (TCP and UDP) and spawns its relays; a port that
    /// cannot be bound (below 1024 without privileges, taken) is logged.
    fn listen(&self, f: Forward) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        match std::net::TcpListener::bind(f.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => {
                let stack = self.stack.clone();
                tasks.push(tokio::spawn(
                    async move { stack.forward_tcp(l, f.target).await },
                ));
            }
            Err(e) => {
                tracing::warn!(listen = %f.listen, error = %e, "cannot listen for a remote service (tcp)")
            }
        }
        match std::net::UdpSocket::bind(f.listen)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(tokio::net::UdpSocket::from_std)
        {
            Ok(s) => {
                let stack = self.stack.clone();
                tasks.push(tokio::spawn(
                    async move { stack.forward_udp(s, f.target).await },
                ));
            }
            Err(e) => {
                tracing::warn!(listen = %f.listen, error = %e, "cannot listen for a remote service (udp)")
            }
        }
        tasks
    }

    /// Stops every listener (and ends the service addresses' relayed
    /// connections).
    pub fn stop(&mut self) {
        for (_, tasks) in self.running.drain() {
            tasks.iter().for_each(JoinHandle::abort);
        }
        self.services.stop();
    }
}

impl Drop for UserspacePlane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::netmap::Member;

    fn member(n: u8, ports: Vec<u16>) -> Member {
        Member {
            public_key: meshlib::keys::PrivateKey::generate().public_key(),
            ip: Ipv4Addr::new(10, 240, 1, n),
            endpoints: vec![],
            service: format!("s{n}"),
            app_id: format!("s{n}").parse().unwrap(),
            process_type: Default::default(),
            index: 1,
            instance: format!("s{n}-1").parse().unwrap(),
            runner: "r".into(),
            ports,
            state: Default::default(),
        }
    }

    #[test]
    fn forwards_cover_other_members_ports_on_their_loopback_address() {
        let mut map = NetworkMap::new(
            meshlib::ids::NetworkId::random(),
            "prod",
            meshlib::ipam::DEFAULT_RANGE,
        );
        let (me, a, b) = (
            member(1, vec![80]),
            member(2, vec![8080, 53]),
            member(3, vec![]),
        );
        for m in [&me, &a, &b] {
            map.members.insert(m.public_key, m.clone());
        }
        let got: Vec<String> = desired_forwards(&map, me.ip, 77)
            .iter()
            .map(|f| format!("{}>{}", f.listen, f.target))
            .collect();
        assert_eq!(
            got,
            [
                "127.77.1.2:53>10.240.1.2:53",
                "127.77.1.2:8080>10.240.1.2:8080"
            ]
        );
        let f = address_map(me.ip, 77);
        assert_eq!(f(&me), Ipv4Addr::LOCALHOST);
        assert_eq!(f(&a), Ipv4Addr::new(127, 77, 1, 2));
        // Service addresses (the block after the /22) never meet members'.
        let s = service_address_map(77);
        assert_eq!(
            s(Ipv4Addr::new(10, 240, 4, 1)),
            Ipv4Addr::new(127, 77, 4, 1)
        );
        assert_eq!(
            s(Ipv4Addr::new(10, 240, 7, 9)),
            Ipv4Addr::new(127, 77, 7, 9)
        );

        // The outputs give the mapped addresses (DNS index and variables).
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(meshlib::names::NameIndex::default()));
        let mut out = crate::outputs::Outputs::new(
            crate::outputs::OutputConfig {
                hosts_file: None,
                env_dir: None,
                overrides: Default::default(),
            },
            tx,
        );
        out.set_address_map(f);
        out.apply(&map);
        assert_eq!(
            rx.borrow().lookup("s2.warp"),
            meshlib::names::Lookup::Found(&[Ipv4Addr::new(127, 77, 1, 2)])
        );
        let vars = out.variables(&map);
        assert!(
            vars.contains(&("WARP_IST_s1".to_owned(), "127.0.0.1".to_owned())),
            "{vars:?}"
        );
        assert!(
            vars.contains(&("WARP_IST_s3".to_owned(), "127.77.1.3".to_owned())),
            "{vars:?}"
        );
    }
}
