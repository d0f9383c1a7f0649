//! What a network map turns into on the instance: the IST names (conflicts
//! reported by service name), the DNS index (swapped in whole), the managed
//! `/etc/hosts` section and the env files. [`Outputs::apply`] runs on the
//! first map and on every change; unchanged files are not rewritten.

use std::borrow::Cow;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use meshlib::fsutil::{update_hosts_file, write_atomic};
use meshlib::ist::config::Overrides;
use meshlib::ist::table::{Conflict, IstTable};
use meshlib::names::NameIndex;
use meshlib::netmap::{Member, NetworkMap};
use meshlib::render::text::escape;
use meshlib::render::{env, hosts};
use tokio::sync::watch;

/// Name of the dotenv file in the state directory.
pub const DOTENV_FILE: &str = "ist.env";
/// Name of the shell env file in the state directory.
pub const SHELL_ENV_FILE: &str = "ist.sh";

/// Where the outputs go.
#[derive(Debug, Clone)]
pub struct OutputConfig {
    /// The hosts file with our managed section; `None` leaves hosts alone.
    pub hosts_file: Option<PathBuf>,
    /// Directory for `ist.env` / `ist.sh`; `None` writes none.
    pub env_dir: Option<PathBuf>,
    /// IST overrides (warp.config.js, then the config's own).
    pub overrides: Overrides,
}

/// What one [`Outputs::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Names claimed by several services (withheld from all of them).
    pub conflicts: Vec<Conflict>,
    /// Service names that cannot be encoded.
    pub invalid_services: Vec<String>,
    /// Whether the hosts file was rewritten.
    pub hosts_changed: bool,
    /// Whether the env files were rewritten.
    pub env_changed: bool,
    /// Why the hosts file could not be written (the rest still works).
    pub hosts_error: Option<String>,
}

/// Which address the outputs give for a member (userspace mode: the
/// loopback address the sidecar listens on for it).
pub type AddressMap = Arc<dyn Fn(&Member) -> Ipv4Addr + Send + Sync>;

/// Which address the outputs give for a service address (userspace mode:
/// the loopback address the sidecar listens on for it).
pub type ServiceAddressMap = Arc<dyn Fn(Ipv4Addr) -> Ipv4Addr + Send + Sync>;

/// How the outputs give service addresses.
#[derive(Clone, Default)]
pub enum ServiceView {
    /// Not at all: services answer their members (the way back).
    #[default]
    Members,
    /// As the map has them (kernel mode).
    Direct,
    /// Through this map (userspace mode: the loopback standing for it).
    Mapped(ServiceAddressMap),
}

/// The outputs of one member.
pub struct Outputs {
    config: OutputConfig,
    names: watch::Sender<Arc<NameIndex>>,
    table: IstTable,
    address_map: Option<AddressMap>,
    services: ServiceView,
}

impl Outputs {
    /// Outputs writing per `config` and publishing name indexes on `names`.
    pub fn new(config: OutputConfig, names: watch::Sender<Arc<NameIndex>>) -> Self {
        Self {
            config,
            names,
            table: IstTable::default(),
            address_map: None,
            services: ServiceView::Members,
        }
    }

    /// Sets how service addresses are given; takes effect at the next apply.
    pub fn set_service_view(&mut self, view: ServiceView) {
        self.services = view;
    }

    /// Makes hosts, env and DNS give `f(member)` in place of each member's
    /// private IP (userspace mode); takes effect at the next apply.
    pub fn set_address_map(&mut self, f: AddressMap) {
        self.address_map = Some(f);
    }

    /// `map` with the address maps applied to its members and service
    /// addresses (or the service addresses taken out).
    fn view<'m>(&self, map: &'m NetworkMap) -> Cow<'m, NetworkMap> {
        let plain = matches!(self.services, ServiceView::Direct) || map.addresses.is_empty();
        if self.address_map.is_none() && plain {
            return Cow::Borrowed(map);
        }
        let mut m = map.clone();
        if let Some(f) = &self.address_map {
            for member in m.members.values_mut() {
                member.ip = f(member);
            }
        }
        match &self.services {
            ServiceView::Members => m.addresses.clear(),
            ServiceView::Direct => {}
            ServiceView::Mapped(f) => {
                for a in m.addresses.values_mut() {
                    a.ip = f(a.ip);
                }
            }
        }
        Cow::Owned(m)
    }

    /// The current IST table (for `sidecar run` and status).
    pub fn table(&self) -> &IstTable {
        &self.table
    }

    /// The IST variables of `map` with the current overrides.
    pub fn variables(&self, map: &NetworkMap) -> Vec<(String, String)> {
        env::ist_variables(&self.view(map), &self.table)
    }

    /// Recomputes everything from `map` and writes what changed.
    pub fn apply(&mut self, map: &NetworkMap) -> ApplyReport {
        let view = self.view(map);
        let map: &NetworkMap = &view;
        self.table = IstTable::build(map.services(), &self.config.overrides);
        let mut report = ApplyReport {
            conflicts: self.table.conflicts.clone(),
            invalid_services: self.table.invalid.iter().map(|(s, _)| s.clone()).collect(),
            ..ApplyReport::default()
        };
        // Service names come from other members: escaped in logs.
        for c in &report.conflicts {
            let conflict = escape(&c.to_string()).into_owned();
            tracing::warn!(kind = %c.kind, name = %escape(&c.name), "IST name conflict: {conflict}");
        }
        for (service, e) in &self.table.invalid {
            let e = escape(&e.to_string()).into_owned();
            tracing::warn!(service = %escape(service), "service name has no IST names: {e}");
        }
        // DNS first: it is what changes "the moment a delta arrives".
        self.names
            .send_replace(Arc::new(NameIndex::build(map, &self.table)));
        self.write_hosts(map, &mut report);
        self.write_env(map, &mut report);
        report
    }

    fn write_hosts(&self, map: &NetworkMap, report: &mut ApplyReport) {
        let Some(path) = &self.config.hosts_file else {
            return;
        };
        let section = hosts::render_section(
            &map.network.to_string(),
            &hosts::map_entries(map, &self.table),
        );
        match update_hosts_file(path, &map.network.to_string(), &section) {
            Ok(changed) => report.hosts_changed = changed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot update the hosts file; DNS and variables still work");
                report.hosts_error = Some(e.to_string());
            }
        }
    }

    fn write_env(&self, map: &NetworkMap, report: &mut ApplyReport) {
        let Some(dir) = &self.config.env_dir else {
            return;
        };
        // `map` is already the view: no second address mapping.
        let vars = env::ist_variables(map, &self.table);
        let pairs = || vars.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (file, text) in [
            (DOTENV_FILE, env::render_dotenv(pairs())),
            (SHELL_ENV_FILE, env::render_shell(pairs())),
        ] {
            match write_atomic(&dir.join(file), text.as_bytes(), 0o644) {
                Ok(changed) => report.env_changed |= changed,
                Err(e) => tracing::warn!(error = %e, "cannot write env file"),
            }
        }
    }

    /// Removes our hosts section (on `sidecar down`).
    pub fn remove_hosts_section(&self, map: &NetworkMap) {
        if let Some(path) = &self.config.hosts_file {
            if let Err(e) = update_hosts_file(path, &map.network.to_string(), "") {
                tracing::warn!(error = %e, "cannot clean the hosts file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlib::keys::PrivateKey;
    use meshlib::names::Lookup;
    use meshlib::netmap::Member;
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt;

    fn member(inst: &str, service: &str, n: u8) -> Member {
        Member {
            public_key: PrivateKey::generate().public_key(),
            ip: Ipv4Addr::new(10, 240, 0, n),
            endpoints: vec![],
            service: service.into(),
            app_id: meshlib::ist::hostname_label(service)
                .unwrap()
                .parse()
                .unwrap(),
            process_type: Default::default(),
            index: 1,
            instance: inst.parse().unwrap(),
            runner: "r".into(),
            ports: vec![],
            state: Default::default(),
        }
    }

    /// Outputs writing `hosts` and env files in `env_dir`, and their name index.
    fn outputs(
        hosts: std::path::PathBuf,
        env_dir: &std::path::Path,
    ) -> (Outputs, watch::Receiver<Arc<NameIndex>>) {
        let (tx, rx) = watch::channel(Arc::new(NameIndex::default()));
        let config = OutputConfig {
            hosts_file: Some(hosts),
            env_dir: Some(env_dir.to_owned()),
            overrides: Overrides::default(),
        };
        (Outputs::new(config, tx), rx)
    }

    fn map_of<const N: usize>(members: [Member; N]) -> NetworkMap {
        let mut map = NetworkMap::new(
            meshlib::ids::NetworkId::random(),
            "prod",
            meshlib::ipam::DEFAULT_RANGE,
        );
        for m in members {
            map.members.insert(m.public_key, m);
        }
        map
    }

    #[test]
    fn apply_writes_everything_and_reports_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let hosts_path = dir.path().join("hosts");
        std::fs::write(&hosts_path, "127.0.0.1 localhost\n").unwrap();
        let (mut out, rx) = outputs(hosts_path.clone(), dir.path());
        let map = map_of([
            member("api-1", "api", 1),
            member("db-1", "my-db", 2),
            member("db-2", "my db", 3),
        ]);
        let r = out.apply(&map);
        assert!(r.hosts_changed && r.env_changed && r.hosts_error.is_none());
        assert_eq!(
            r.conflicts
                .iter()
                .filter(|c| c.name == "my-db.warp")
                .count(),
            1
        );
        assert_eq!(
            rx.borrow().lookup("api.warp"),
            Lookup::Found(&[Ipv4Addr::new(10, 240, 0, 1)])
        );
        let hosts = std::fs::read_to_string(&hosts_path).unwrap();
        assert!(hosts.starts_with("127.0.0.1 localhost\n# BEGIN ist-mesh pn-"));
        assert!(hosts.contains("10.240.0.1\tapi.warp api-1.internal\n"));
        assert!(!hosts.contains("my-db.warp"), "conflicting name withheld");
        let dotenv = std::fs::read_to_string(dir.path().join(DOTENV_FILE)).unwrap();
        assert!(dotenv.contains("WARP_IST_api=10.240.0.1\n"));
        // Same map again: nothing rewritten.
        let r = out.apply(&map);
        assert!(!r.hosts_changed && !r.env_changed);
    }

    #[test]
    fn read_only_hosts_is_a_warning_and_the_rest_works() {
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        let hosts_path = ro.join("hosts");
        // A directory where the hosts file should be: writing fails for root too.
        std::fs::create_dir(&hosts_path).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        let (mut out, rx) = outputs(hosts_path, dir.path());
        let map = map_of([member("api-1", "api", 1)]);
        let r = out.apply(&map);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(r.hosts_error.is_some());
        assert!(r.env_changed);
        assert!(matches!(
            rx.borrow().lookup("api-1.internal"),
            Lookup::Found(_)
        ));
    }
}
