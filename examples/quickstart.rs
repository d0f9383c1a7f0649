//! The IST Mesh quickstart.
//!
//! Today it shows the naming core on a demo deployment (`web`, `api`, and a
//! database service called `my db`, whose name shows the encoding): the names
//! and variables each service gets, what the private DNS names answer, and
//! the `/etc/hosts` section and env files a sidecar writes. The encrypted
//! tunnels between sidecars and the keyserver are added by the next issues;
//! this example then starts them for real.

use meshlib::ids::NetworkId;
use meshlib::ist::config::parse_warp_config_js;
use meshlib::ist::table::IstTable;
use meshlib::keys::PrivateKey;
use meshlib::names::{InternalName, NameIndex};
use meshlib::netmap::{Member, NetworkMap};
use meshlib::render::{env, hosts};

fn main() -> anyhow::Result<()> {
    let network: NetworkId = NetworkId::random();
    let mut map = NetworkMap::new(network, "demo", meshlib::ipam::DEFAULT_RANGE);
    let mut alloc = meshlib::ipam::Allocator::new(map.range, meshlib::ipam::DEFAULT_QUARANTINE)?;
    for (instance, service, ptype, index) in [
        ("web-1", "web", "web", 1),
        ("api-1", "api", "web", 1),
        ("api-2", "api", "web", 2),
        ("api-worker-1", "api", "worker", 1),
        ("db-1", "my db", "web", 1),
    ] {
        let member = Member {
            public_key: PrivateKey::generate().public_key(),
            ip: alloc.allocate(std::time::SystemTime::now())?,
            endpoints: vec![],
            service: service.into(),
            app_id: meshlib::ist::hostname_label(service)?.parse()?,
            process_type: ptype.parse()?,
            index,
            instance: instance.parse()?,
            runner: "runner-1".into(),
            ports: vec![],
        };
        map.members.insert(member.public_key, member);
    }

    println!(
        "== Network {} ({}), range {}\n",
        map.network, map.name, map.range
    );
    println!("== IST names (seed 004), as `sidecar ist-names` prints them");
    for service in map.services() {
        println!("{}", meshlib::ist::encode(service)?);
    }

    // An override from a warp.config.js, as a service's repository would carry it.
    let overrides = parse_warp_config_js(
        "module.exports = { ist: [ { service: 'my db', variables: ['DATABASE_HOST'], hostnames: ['db.local'] } ] };",
    )?;
    let table = IstTable::build(map.services(), &overrides);
    println!("\n== With a warp.config.js override for \"my db\"");
    for e in &table.entries {
        println!(
            "{:8} hostnames {:?} variables {:?}",
            e.service, e.hostnames, e.variables
        );
    }

    println!("\n== Private DNS names (seeds 001, 003)");
    let index = NameIndex::build(&map, &table);
    let pn = map.network;
    for name in [
        "api-2.internal".to_string(),
        format!("api.{pn}.private-network.internal."),
        format!("worker.api.{pn}.private-network.internal."),
        format!("2.web.api.{pn}.private-network.internal."),
    ] {
        let ips = name.parse::<InternalName>()?.resolve(&map);
        println!("{name:70} -> {ips:?}");
    }
    println!(
        "{:70} -> {:?}",
        "api.demo.private-network.internal. (alias)",
        index.lookup("api.demo.private-network.internal")
    );

    println!("\n== The /etc/hosts section a sidecar writes");
    let lines = hosts::map_entries(&map, &table);
    print!(
        "{}",
        hosts::render_section(&map.network.to_string(), &lines)
    );

    println!("\n== The env files (dotenv, then shell)");
    let vars = env::ist_variables(&map, &table);
    let pairs = || vars.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    print!("{}", env::render_dotenv(pairs()));
    print!("{}", env::render_shell(pairs()));

    println!("\nNot built yet (open issues): the WireGuard data plane (3), the keyserver (4),");
    println!("the sidecar agent (5), userspace mode (6) and the multi-runner suite (7).");
    println!("When they land, this example starts a keyserver and three sidecars and sends");
    println!("requests between them through the encrypted tunnels.");
    Ok(())
}
