//! Service addresses on the virtual clock (issue 19): every service gets
//! its own address at its first join, from the network's service range;
//! it stays through restarts, and through zero instances; members of
//! protocol version 4 get it in their maps.

use std::time::Duration;

use keyserver::registry::Lifecycle;
use meshlib::netmap::default_service_range;
use meshsim::{JoinSpec, Sim, SimConfig};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn a_service_keeps_its_address_through_restarts_and_zero_instances() {
    let mut s = Sim::new(SimConfig {
        seed: 21,
        lifecycle: Lifecycle {
            offline_after: secs(30),
            expire_after: secs(24 * 3600),
            ephemeral_after: None,
        },
        ..SimConfig::default()
    });
    let net = s.create_network("prod");
    let token = s.token(net, 20);
    let spec = |service: &str| JoinSpec {
        service: service.into(),
        ephemeral: true,
        ..JoinSpec::default()
    };
    let observer = s.join_with(&token, &spec("client"));
    let api = s.join_with(&token, &spec("api"));
    let db = s.join_with(&token, &spec("db"));
    s.run_until(secs(5), |s| {
        s.member(observer).map().addresses.len() == 3 && s.member(api).core.welcome().is_some()
    })
    .unwrap();
    let map = s.member(observer).map().clone();
    let range = map.service_range.expect("a service range");
    assert_eq!(Some(range), default_service_range(map.range));
    let vip = map.addresses["api"].ip;
    assert!(range.contains(&vip) && !map.range.contains(&vip));
    assert_ne!(vip, map.addresses["db"].ip, "one address per service");
    assert_eq!(s.member(observer).resolve_service("api.warp"), [vip]);
    let api_ip = s.member(api).core.welcome().unwrap().ip;
    assert_eq!(
        s.member(observer).resolve("api.warp"),
        [api_ip],
        "the way back"
    );
    assert_eq!(
        map.backends("api").iter().map(|m| m.ip).collect::<Vec<_>>(),
        [api_ip]
    );
    // To zero instances: the ephemeral member is freed, the address stays,
    // with no backend behind it.
    s.stop(api);
    let api_key = s.member(api).public_key();
    s.run_until(secs(90), |s| {
        !s.member(observer).map().members.contains_key(&api_key)
    })
    .unwrap();
    let map = s.member(observer).map();
    assert_eq!(map.addresses["api"].ip, vip);
    assert!(map.backends("api").is_empty());
    assert_eq!(s.member(observer).resolve_service("api.warp"), [vip]);
    // A new instance: the same address, now balanced over it.
    let again = s.join_with(&token, &spec("api"));
    s.run_until(secs(5), |s| s.member(again).core.welcome().is_some())
        .unwrap();
    s.run_for(secs(1));
    let map = s.member(observer).map();
    assert_eq!(map.addresses["api"].ip, vip);
    let ip = s.member(again).core.welcome().unwrap().ip;
    assert_eq!(
        map.backends("api").iter().map(|m| m.ip).collect::<Vec<_>>(),
        [ip]
    );
    assert!(s.member(db).ended.is_none());
}
