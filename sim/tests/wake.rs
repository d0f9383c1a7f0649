//! Scale to zero on internal traffic (issue 19, control plane) on the
//! virtual clock: members that find a wakeable service at zero instances
//! ask the keyserver to wake it, and its hook runs once however many ask;
//! members' traffic reports keep a service awake, and one without flows
//! for `idle-after` is reported idle once (its idle hook once per idle
//! period).

use std::time::Duration;

use keyserver::registry::{AddressSettings, HookKind, Lifecycle};
use meshlib::services::WakeHook;
use meshlib::traffic::{PairTraffic, TrafficCounters, TrafficReport};
use meshsim::{JoinSpec, MemberId, Sim, SimConfig};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn sim(seed: u64) -> Sim {
    Sim::new(SimConfig {
        seed,
        loss: 0.05,
        lifecycle: Lifecycle {
            offline_after: secs(30),
            expire_after: secs(24 * 3600),
            ephemeral_after: None,
        },
        ..SimConfig::default()
    })
}

fn spec(service: &str) -> JoinSpec {
    JoinSpec {
        service: service.into(),
        ephemeral: true,
        ..JoinSpec::default()
    }
}

fn wake_hook(timeout: u16) -> AddressSettings {
    AddressSettings {
        wake: Some(Some(WakeHook::Url("http://192.0.2.9/wake".into()))),
        wake_timeout_secs: Some(timeout),
        ..Default::default()
    }
}

fn wakeable_in_every_map(s: &Sim, ids: &[MemberId]) -> bool {
    ids.iter().all(|&i| {
        s.member(i)
            .map()
            .addresses
            .get("api")
            .is_some_and(|a| a.wake_timeout_secs.is_some())
    })
}

#[test]
fn three_members_asking_at_once_run_the_hook_once() {
    let mut s = sim(31);
    let net = s.create_network("prod");
    let token = s.token(net, 20);
    let api = s.join_with(&token, &spec("api"));
    let clients: Vec<MemberId> = (0..3).map(|_| s.join_with(&token, &spec("web"))).collect();
    s.run_until(secs(5), |s| {
        clients
            .iter()
            .all(|&c| s.member(c).map().addresses.len() == 2)
    })
    .unwrap();
    // The api instance stops; its ephemeral slot is freed: zero instances,
    // the address stays.
    s.stop(api);
    let api_key = s.member(api).public_key();
    s.run_until(secs(90), |s| {
        clients
            .iter()
            .all(|&c| !s.member(c).map().members.contains_key(&api_key))
    })
    .unwrap();
    s.set_address(net, "api", &wake_hook(20)).unwrap();
    s.run_until(secs(5), |s| wakeable_in_every_map(s, &clients))
        .unwrap();
    let ip = s.member(clients[0]).map().addresses["api"].ip;
    // All three at the same instant.
    for &c in &clients {
        assert_eq!(s.wake(c, "api"), Ok(true));
    }
    s.run_for(secs(2));
    assert_eq!(s.hooks().count(HookKind::Wake, "api"), 1);
    let job = &s.hooks().jobs()[0];
    assert_eq!(
        (job.service.as_str(), job.ip, job.network),
        ("api", ip, net)
    );
    assert_eq!(job.timeout, secs(20));
    assert!(s.address(net, "api").unwrap().waking);
    // Asking again within the timeout sends nothing.
    for &c in &clients {
        assert_eq!(s.wake(c, "api"), Ok(false));
    }
    // After the timeout, still nothing online: once more, once.
    s.run_for(secs(19));
    for &c in &clients {
        assert_eq!(s.wake(c, "api"), Ok(true));
    }
    s.run_for(secs(2));
    assert_eq!(s.hooks().count(HookKind::Wake, "api"), 2);
    // The woken instance comes: a later request is refused, nothing runs.
    let woken = s.join_with(&token, &spec("api"));
    s.run_until(secs(5), |s| {
        s.member(clients[0]).map().backends("api").len() == 1
            && s.member(woken).core.welcome().is_some()
    })
    .unwrap();
    assert!(!s.address(net, "api").unwrap().waking);
    s.run_for(secs(20));
    assert_eq!(s.wake(clients[0], "api"), Ok(true));
    s.run_for(secs(2));
    assert_eq!(s.hooks().count(HookKind::Wake, "api"), 2);
    let refused = s
        .trace()
        .iter()
        .any(|l| l.contains(&format!("m{} rejected Forbidden", clients[0])));
    assert!(refused, "the refusal reached the member");
    assert!(clients.iter().all(|&c| s.member(c).ended.is_none()));
}

fn report(opened: u64) -> TrafficReport {
    TrafficReport {
        pairs: vec![PairTraffic {
            destination: "api".into(),
            counters: TrafficCounters {
                opened,
                bytes_sent: 100 * opened,
                ..Default::default()
            },
        }],
        ..Default::default()
    }
}

#[test]
fn a_service_without_flows_for_idle_after_is_reported_once() {
    let mut s = sim(32);
    let net = s.create_network("prod");
    let token = s.token(net, 20);
    let api = s.join_with(&token, &spec("api"));
    let web = s.join_with(&token, &spec("web"));
    s.run_until(secs(5), |s| {
        s.member(web).map().addresses.len() == 2 && s.member(api).core.welcome().is_some()
    })
    .unwrap();
    let idle = AddressSettings {
        idle_after_secs: Some(Some(60)),
        idle_hook: Some(Some(WakeHook::Url("http://192.0.2.9/idle".into()))),
        ..Default::default()
    };
    s.set_address(net, "api", &idle).unwrap();
    // Two minutes of new flows, a report every 5 s (sent every 10 s).
    let mut opened = 0;
    for _ in 0..24 {
        opened += 1;
        s.report_traffic(web, report(opened)).unwrap();
        s.run_for(secs(5));
    }
    let a = s.address(net, "api").unwrap();
    assert!(!a.idle && a.record.last_flow.is_some());
    assert_eq!(s.hooks().count(HookKind::Idle, "api"), 0);
    // No new flow from here: idle after 60 s (and at most the report
    // interval plus the write granularity, 10 + 15 s, later).
    let quiet = s.elapsed();
    let took = s
        .run_until(secs(200), |s| s.address(net, "api").unwrap().idle)
        .expect("reported idle");
    assert!(took >= secs(60) && took <= secs(60 + 25 + 2), "{took:?}");
    assert_eq!(s.hooks().count(HookKind::Idle, "api"), 1);
    let page = s.shared.render_metrics();
    assert!(
        page.contains(&format!(
            "istmesh_keyserver_service_idle{{network=\"{net}\",service=\"api\"}} 1"
        )),
        "{page}"
    );
    // Still idle five minutes on: no second run.
    s.run_for(secs(300));
    assert_eq!(s.hooks().count(HookKind::Idle, "api"), 1);
    // A new flow wakes it up in the report; idle again later, the hook
    // again (a new idle period).
    s.report_traffic(web, report(opened + 1)).unwrap();
    s.run_until(secs(15), |s| !s.address(net, "api").unwrap().idle)
        .expect("a flow ends the idle period");
    s.run_until(secs(200), |s| s.address(net, "api").unwrap().idle)
        .expect("idle again");
    assert_eq!(s.hooks().count(HookKind::Idle, "api"), 2);
    assert!(s.elapsed() > quiet);
    // A report about a service the network lacks changes nothing.
    let mut ghost = report(opened + 2);
    ghost.pairs[0].destination = "ghost".into();
    s.report_traffic(web, ghost).unwrap();
    s.run_for(secs(15));
    assert!(s.address(net, "api").unwrap().idle);
    assert!(s.address(net, "ghost").is_none());
}
