//! Slots on the virtual clock (issue 18): stateless restarts take their
//! slot over, a crash loop never fills a network, `--replace`, ephemeral
//! expiry and the 1..N numbering, with real member cores and the real
//! keyserver sessions.

use std::time::Duration;

use keyserver::registry::Lifecycle;
use meshlib::ids::NetworkId;
use meshlib::member::{End, Revocation};
use meshlib::netmap::MemberState;
use meshsim::{JoinSpec, MemberId, Sim, SimConfig};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A sim with the default timers: offline after 30 s, ephemeral members
/// freed 30 s after that.
fn sim(seed: u64) -> Sim {
    Sim::new(SimConfig {
        seed,
        lifecycle: Lifecycle {
            offline_after: secs(30),
            expire_after: secs(24 * 3600),
            ephemeral_after: None,
        },
        ..SimConfig::default()
    })
}

fn web(service: &str) -> JoinSpec {
    JoinSpec {
        service: service.into(),
        ephemeral: true,
        ..JoinSpec::default()
    }
}

fn welcomed(s: &Sim, id: MemberId) -> bool {
    s.member(id).core.welcome().is_some()
}

fn sees(s: &Sim, who: MemberId, whom: MemberId) -> bool {
    s.member(who)
        .plane
        .peers
        .contains_key(&s.member(whom).public_key())
}

/// Members the keyserver holds in a network (each holds an address).
fn held(s: &Sim, net: NetworkId) -> usize {
    s.shared.read(|r| r.member_count(net))
}

fn seed_003(s: &Sim, of: MemberId, n: u32, net: NetworkId) -> String {
    let w = s.member(of).core.welcome().unwrap();
    format!("{n}.web.{}.{net}.private-network.internal", w.app_id)
}

#[test]
fn a_thousand_stateless_restarts_keep_one_slot_and_peers_switch_keys() {
    let mut s = sim(11);
    let net = s.create_network("prod");
    let token = s.token(net, 2000);
    let observer = s.join_with(&token, &web("client"));
    let mut live = s.join_with(&token, &web("api"));
    s.run_until(secs(5), |s| sees(s, observer, live) && welcomed(s, live))
        .unwrap();
    let first = s.member(live).core.welcome().unwrap().clone();
    let one = seed_003(&s, live, 1, net);
    for round in 0..1000 {
        s.stop(live);
        let next = s.join_with(&token, &web("api"));
        let old_key = s.member(live).public_key();
        let took = s
            .run_until(secs(5), |s| {
                sees(s, observer, next)
                    && !s.member(observer).plane.peers.contains_key(&old_key)
                    && welcomed(s, next)
            })
            .unwrap_or_else(|| panic!("round {round}: the observer never switched keys"));
        assert!(took < secs(1), "round {round}: switch took {took:?}");
        let w = s.member(next).core.welcome().unwrap();
        assert_eq!(
            (w.ip, w.index, &w.instance),
            (first.ip, 1, &first.instance),
            "round {round}"
        );
        live = next;
        // At most one address besides the observer's and the live one's.
        assert!(held(&s, net) <= 3, "round {round}: {} held", held(&s, net));
    }
    assert_eq!(held(&s, net), 2);
    let peer = &s.member(observer).plane.peers[&s.member(live).public_key()];
    assert_eq!(peer.allowed_ips[0].addr(), std::net::IpAddr::V4(first.ip));
    // Names follow: the instance name, seed 003's first web, the service.
    assert_eq!(
        s.member(observer)
            .resolve(&format!("{}.internal", first.instance)),
        [first.ip]
    );
    assert_eq!(s.member(observer).resolve(&one), [first.ip]);
    assert_eq!(s.member(observer).resolve("api.warp"), [first.ip]);
}

#[test]
fn a_crash_looping_deployment_never_exhausts_a_22() {
    let mut s = sim(12);
    let net = s.create_network("prod");
    let token = s.token(net, 20_000);
    let services = ["web", "api", "worker", "db", "cache"];
    let mut live: Vec<MemberId> = (0..50)
        .map(|i| s.join_with(&token, &web(services[i % 5])))
        .collect();
    s.run_for(secs(2));
    let mut max_held = 0;
    for round in 0..200 {
        for slot in live.iter_mut() {
            // Killed without a word, restarted without its state.
            s.kill(*slot);
            let svc = s.member(*slot).core.welcome().map(|w| w.instance.clone());
            let service = svc
                .as_ref()
                .and_then(|i| services.iter().find(|n| i.as_str().starts_with(*n)))
                .copied()
                .unwrap_or("web");
            *slot = s.join_with(&token, &web(service));
        }
        s.run_for(secs(10));
        for &m in &live {
            assert!(
                s.member(m).ended.is_none(),
                "round {round}: a join failed: {:?}",
                s.member(m).ended
            );
        }
        max_held = max_held.max(held(&s, net));
    }
    assert!(max_held < 1022, "held {max_held}");
    eprintln!("crash loop: at most {max_held} addresses held by 50 live instances");
}

#[test]
fn an_online_slot_is_refused_without_replace_and_taken_with_it() {
    let mut s = sim(13);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let observer = s.join_with(&token, &web("client"));
    let old = s.join_with(&token, &web("api"));
    s.run_until(secs(5), |s| sees(s, observer, old) && welcomed(s, old))
        .unwrap();
    let w = s.member(old).core.welcome().unwrap().clone();
    let named = JoinSpec {
        instance: Some(w.instance.clone()),
        ..web("api")
    };
    let refused = s.join_with(&token, &named);
    s.run_until(secs(5), |s| s.member(refused).ended.is_some())
        .unwrap();
    match &s.member(refused).ended {
        Some(End::Refused(e)) => {
            assert_eq!(e.code, meshlib::proto::ErrorCode::InstanceTaken);
            assert!(e.message.contains("--replace"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(sees(&s, observer, old), "nothing changed");
    let replacing = s.join_with(
        &token,
        &JoinSpec {
            replace: true,
            ..named
        },
    );
    let old_key = s.member(old).public_key();
    s.run_until(secs(5), |s| {
        sees(s, observer, replacing)
            && !s.member(observer).plane.peers.contains_key(&old_key)
            && s.member(old).ended.is_some()
            && welcomed(s, replacing)
    })
    .unwrap();
    let nw = s.member(replacing).core.welcome().unwrap();
    assert_eq!(
        (nw.ip, &nw.instance, nw.index),
        (w.ip, &w.instance, w.index)
    );
    // The old instance was told it was replaced: a revocation (it forgets).
    match &s.member(old).ended {
        Some(End::Revoked(r)) => assert_eq!(r.reason, Revocation::Replaced, "{r}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ephemeral_members_are_freed_after_ephemeral_after() {
    let mut s = sim(14);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let observer = s.join_with(&token, &web("client"));
    let eph = s.join_with(&token, &web("api"));
    let kept = s.join_with(
        &token,
        &JoinSpec {
            ephemeral: false,
            ..web("db")
        },
    );
    s.run_until(secs(5), |s| {
        sees(s, observer, eph) && sees(s, observer, kept)
    })
    .unwrap();
    let (ek, kk) = (s.member(eph).public_key(), s.member(kept).public_key());
    s.stop(eph);
    s.stop(kept);
    let state = |s: &Sim, k| s.member(observer).map().members.get(&k).map(|m| m.state);
    s.run_until(secs(2), |s| state(s, ek) == Some(MemberState::Offline))
        .unwrap();
    let took = s.run_until(secs(60), |s| state(s, ek).is_none()).unwrap();
    assert!(took >= secs(28) && took <= secs(33), "freed after {took:?}");
    assert_eq!(state(&s, kk), Some(MemberState::Offline), "kept its slot");
    s.run_for(secs(600));
    assert_eq!(state(&s, kk), Some(MemberState::Offline));
}

/// Random restarts (graceful and crashed), scale-ins from the top and
/// scale-outs of one ephemeral web type: after every step has settled,
/// an observer's `1.web` … `N.web` answer the N live instances, in index
/// order, and nothing past N answers; when nothing crashed, the live
/// instances hold indexes 1..N.
#[test]
fn numbering_follows_the_live_instances_after_random_restarts() {
    for seed in 0..8u64 {
        let mut s = sim(100 + seed);
        let net = s.create_network("prod");
        let token = s.token(net, 10_000);
        let observer = s.join_with(&token, &web("client"));
        let mut live: Vec<MemberId> = vec![];
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut crashed = false;
        for _ in 0..40 {
            match next() % 5 {
                0 | 1 => live.push(s.join_with(&token, &web("api"))),
                2 if !live.is_empty() => {
                    // Scale in from the top, as platforms do.
                    let top = (0..live.len())
                        .max_by_key(|&i| s.member(live[i]).core.welcome().map_or(0, |w| w.index))
                        .unwrap();
                    s.stop(live.remove(top));
                }
                3 if !live.is_empty() => {
                    let i = (next() % live.len() as u64) as usize;
                    s.stop(live[i]);
                    live[i] = s.join_with(&token, &web("api"));
                }
                4 if !live.is_empty() && next() % 4 == 0 => {
                    crashed = true;
                    let i = (next() % live.len() as u64) as usize;
                    s.kill(live[i]);
                    live[i] = s.join_with(&token, &web("api"));
                }
                _ => {}
            }
            s.run_for(secs(5));
        }
        // Settle: silences noticed, the dead freed.
        s.run_for(secs(90));
        let mut ips: Vec<(u32, std::net::Ipv4Addr)> = live
            .iter()
            .map(|&m| {
                let w = s.member(m).core.welcome().unwrap();
                (w.index, w.ip)
            })
            .collect();
        ips.sort_unstable();
        if let Some(&first) = live.first() {
            for (rank, (_, ip)) in ips.iter().enumerate() {
                let name = seed_003(&s, first, rank as u32 + 1, net);
                assert_eq!(
                    s.member(observer).resolve(&name),
                    [*ip],
                    "seed {seed}: {name}"
                );
            }
            let past = seed_003(&s, first, ips.len() as u32 + 1, net);
            assert!(s.member(observer).resolve(&past).is_empty(), "seed {seed}");
        }
        if !crashed {
            let idx: Vec<u32> = ips.iter().map(|(i, _)| *i).collect();
            let want: Vec<u32> = (1..=live.len() as u32).collect();
            assert_eq!(idx, want, "seed {seed}");
        }
        assert_eq!(
            held(&s, net),
            live.len() + 1,
            "seed {seed}: only the live are held"
        );
    }
}
