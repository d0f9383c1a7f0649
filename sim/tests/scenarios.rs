//! Control-plane scenarios on the virtual clock: the real keyserver registry
//! and stream sessions, real member cores, simulated links. No sockets, no
//! sleeps, no root; every scenario runs in milliseconds of wall time.

use std::time::{Duration, Instant};

use keyserver::registry::Lifecycle;
use meshlib::member::{End, MemberConfig, Revocation, Revoked};
use meshlib::netmap::MemberState;
use meshsim::{MemberId, Sim, SimConfig};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A sim with short lifecycle timers (offline after 30 s, as the default;
/// expiry after 120 s).
fn sim(seed: u64) -> Sim {
    Sim::new(SimConfig {
        seed,
        lifecycle: Lifecycle {
            offline_after: secs(30),
            expire_after: secs(120),
            ephemeral_after: None,
        },
        ..SimConfig::default()
    })
}

/// Whether every live member of `ids` has every other one as a peer.
fn all_see_each_other(s: &Sim, ids: &[MemberId]) -> bool {
    ids.iter().all(|&a| {
        ids.iter().filter(|&&b| b != a).all(|&b| {
            s.member(a)
                .plane
                .peers
                .contains_key(&s.member(b).public_key())
        })
    })
}

fn sees(s: &Sim, who: MemberId, whom: MemberId) -> bool {
    s.member(who)
        .plane
        .peers
        .contains_key(&s.member(whom).public_key())
}

/// The member's core has its welcome (a peer may learn of a join before
/// the joiner itself does).
fn welcomed(s: &Sim, id: MemberId) -> bool {
    s.member(id).core.welcome().is_some()
}

fn state_at(s: &Sim, who: MemberId, whom: MemberId) -> Option<MemberState> {
    s.member(who)
        .map()
        .members
        .get(&s.member(whom).public_key())
        .map(|m| m.state)
}

#[test]
fn join_map_deltas_resume_and_revocation() {
    let mut s = sim(1);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let a = s.join(&token, "api", "web");
    let b = s.join(&token, "api", "web");
    let c = s.join(&token, "db", "web");
    assert!(s
        .run_until(secs(5), |s| all_see_each_other(s, &[a, b, c]))
        .is_some());
    let (wa, wb) = (
        s.member(a).core.welcome().unwrap().clone(),
        s.member(b).core.welcome().unwrap().clone(),
    );
    let mut indexes = [wa.index, wb.index];
    indexes.sort_unstable();
    assert_eq!(indexes, [1, 2]);
    assert_eq!(wa.app_id, wb.app_id, "same service, same app id");
    assert_eq!(s.member(a).resolve("api.warp").len(), 2);
    // b crashes and comes back: resumes from its generation, same address.
    s.kill(b);
    s.run_for(secs(2));
    let d = s.join(&token, "cache", "web");
    s.run_until(secs(5), |s| sees(s, a, d)).unwrap();
    s.restart(b);
    s.run_until(secs(5), |s| all_see_each_other(s, &[a, b, c, d]))
        .unwrap();
    assert_eq!(s.member(b).core.welcome().unwrap().ip, wb.ip);
    let resumed_by_delta = s
        .trace()
        .iter()
        .rev()
        .take_while(|l| !l.contains("m1 restarted"))
        .any(|l| l.contains("m1 delta"));
    assert!(resumed_by_delta, "the resume caught up by delta");
    // Revocation: every peer drops c within a second.
    s.remove_member(c);
    let took = s
        .run_until(secs(5), |s| {
            !sees(s, a, c) && !sees(s, b, c) && !sees(s, d, c)
        })
        .unwrap();
    assert!(took < secs(1), "revocation took {took:?}");
    // c's own end travels with its own latency: wait for it too.
    s.run_until(secs(1), |s| s.member(c).ended.is_some());
    assert!(matches!(
        s.member(c).ended,
        Some(End::Revoked(Revoked {
            reason: Revocation::Removed,
            ..
        }))
    ));
    assert!(s.member(a).resolve("db.warp").is_empty());
}

#[test]
fn kill_goes_offline_after_the_timeout_and_restart_comes_back() {
    let mut s = sim(2);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let ids: Vec<_> = ["web", "api", "db"]
        .iter()
        .map(|n| s.join(&token, n, "web"))
        .collect();
    s.run_until(secs(5), |s| all_see_each_other(s, &ids))
        .unwrap();
    let ip = s.member(ids[2]).core.welcome().unwrap().ip;
    s.run_for(secs(7));
    s.kill(ids[2]);
    let took = s
        .run_until(secs(60), |s| {
            !sees(s, ids[0], ids[2]) && !sees(s, ids[1], ids[2])
        })
        .unwrap();
    // Silent for offline-after (30 s) since its last heartbeat, then the
    // next sweep (1 s).
    assert!(took <= secs(32), "offline took {took:?}");
    assert!(took >= secs(20), "offline too early: {took:?}");
    assert_eq!(state_at(&s, ids[0], ids[2]), Some(MemberState::Offline));
    assert!(s.member(ids[0]).resolve("db.warp").is_empty());
    assert!(s.member(ids[0]).resolve("db-web-1.internal").is_empty());
    // Its reservation holds: a newcomer of db gets index 2.
    let newcomer = s.join(&token, "db", "web");
    s.run_until(secs(5), |s| {
        sees(s, ids[0], newcomer) && welcomed(s, newcomer)
    })
    .unwrap();
    assert_eq!(s.member(newcomer).core.welcome().unwrap().index, 2);
    assert_eq!(
        s.member(ids[0]).resolve("db.warp"),
        [s.member(newcomer).core.welcome().unwrap().ip],
        "db.warp points at the online instance"
    );
    // Restarted: online again with the same address and index.
    s.restart(ids[2]);
    s.run_until(secs(5), |s| {
        sees(s, ids[0], ids[2]) && sees(s, ids[1], ids[2]) && welcomed(s, ids[2])
    })
    .unwrap();
    let w = s.member(ids[2]).core.welcome().unwrap();
    assert_eq!((w.ip, w.index), (ip, 1));
    assert_eq!(state_at(&s, ids[0], ids[2]), Some(MemberState::Online));
}

#[test]
fn graceful_stop_is_offline_at_once_and_leave_releases() {
    let mut s = sim(3);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let ids: Vec<_> = (0..3).map(|_| s.join(&token, "api", "web")).collect();
    s.run_until(secs(5), |s| all_see_each_other(s, &ids))
        .unwrap();
    s.stop(ids[1]);
    let took = s
        .run_until(secs(5), |s| {
            !sees(s, ids[0], ids[1]) && !sees(s, ids[2], ids[1])
        })
        .unwrap();
    assert!(took < secs(1), "graceful stop took {took:?}");
    assert_eq!(
        s.member(ids[1]).ended,
        Some(End::Offline { confirmed: true })
    );
    assert_eq!(state_at(&s, ids[0], ids[1]), Some(MemberState::Offline));
    let stopped_ip = s.member(ids[1]).core.welcome().unwrap().ip;
    // Leave: gone from the map, its address quarantined (not reused).
    s.leave(ids[2]);
    s.run_until(secs(5), |s| s.member(ids[0]).map().members.len() == 2)
        .unwrap();
    assert_eq!(s.member(ids[2]).ended, Some(End::Left));
    let left = s.member(ids[2]).core.welcome().unwrap().clone();
    let left_ip = left.ip;
    let n = s.join(&token, "api", "web");
    s.run_until(secs(5), |s| sees(s, ids[0], n) && welcomed(s, n))
        .unwrap();
    let w = s.member(n).core.welcome().unwrap();
    assert_ne!(w.ip, left_ip, "the left member's address is quarantined");
    assert_ne!(w.ip, stopped_ip, "the stopped member's address is reserved");
    assert_eq!(
        w.index, left.index,
        "the offline member keeps its index, the left one's is free again"
    );
}

#[test]
fn expiry_releases_and_a_new_instance_takes_index_one() {
    let mut s = sim(4);
    let net = s.create_network("prod");
    s.set_expire_after(net, secs(60));
    let token = s.token(net, 10);
    let web = s.join(&token, "web", "web");
    let cache = s.join(&token, "cache", "web");
    s.run_until(secs(5), |s| all_see_each_other(s, &[web, cache]))
        .unwrap();
    s.kill(cache);
    // Offline after ~30 s, expired 60 s after that.
    s.run_until(secs(40), |s| {
        state_at(s, web, cache) == Some(MemberState::Offline)
    })
    .unwrap();
    let took = s
        .run_until(secs(120), |s| state_at(s, web, cache).is_none())
        .unwrap();
    assert!(
        took >= secs(59) && took <= secs(62),
        "expired after {took:?}"
    );
    let fresh = s.join(&token, "cache", "web");
    s.run_until(secs(5), |s| sees(s, web, fresh) && welcomed(s, fresh))
        .unwrap();
    let w = s.member(fresh).core.welcome().unwrap();
    assert_eq!(w.index, 1);
    assert_eq!(w.instance.as_str(), "cache-web-1");
    assert_eq!(s.member(web).resolve("cache.warp"), [w.ip]);
    // The dead one restarting finds its membership gone: the keyserver
    // does not know its credential, a revocation (it forgets it).
    s.restart(cache);
    s.run_until(secs(5), |s| s.member(cache).ended.is_some())
        .unwrap();
    assert!(matches!(
        s.member(cache).ended,
        Some(End::Revoked(Revoked {
            reason: Revocation::UnknownCredential,
            ..
        }))
    ));
}

#[test]
fn rotation_keeps_address_and_names_and_peers_follow() {
    let mut s = sim(5);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let ids: Vec<_> = ["web", "api", "db"]
        .iter()
        .map(|n| s.join(&token, n, "web"))
        .collect();
    s.run_until(secs(5), |s| all_see_each_other(s, &ids))
        .unwrap();
    let before = s.member(ids[1]).core.welcome().unwrap().clone();
    let old = s.member(ids[1]).public_key();
    let new = s.rotate(ids[1]);
    let took = s
        .run_until(secs(5), |s| {
            [ids[0], ids[2]].iter().all(|&p| {
                let peers = &s.member(p).plane.peers;
                peers.contains_key(&new) && !peers.contains_key(&old)
            }) && s.member(ids[1]).public_key() == new
        })
        .unwrap();
    assert!(took < secs(1), "rotation took {took:?}");
    let peer = &s.member(ids[0]).plane.peers[&new];
    assert_eq!(peer.allowed_ips[0].addr(), std::net::IpAddr::V4(before.ip));
    assert_eq!(s.member(ids[0]).resolve("api.warp"), [before.ip]);
    assert_eq!(s.member(ids[1]).core.membership().unwrap().public_key, new);
    // The rotated member resumes with its new key after a crash.
    s.kill(ids[1]);
    s.restart(ids[1]);
    s.run_until(secs(5), |s| {
        s.member(ids[1]).core.connection() == meshlib::member::Connection::Connected
    })
    .unwrap();
    assert_eq!(s.member(ids[1]).core.welcome().unwrap().ip, before.ip);
    assert!(s.member(ids[1]).ended.is_none());
}

#[test]
fn rotation_cut_off_is_finished_on_reconnect() {
    let mut s = sim(6);
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let a = s.join(&token, "web", "web");
    let b = s.join(&token, "api", "web");
    s.run_until(secs(5), |s| all_see_each_other(s, &[a, b]))
        .unwrap();
    // The request leaves, then b is cut off before the answer comes back.
    let new = s.rotate(b);
    s.run_until(secs(1), |s| s.member(a).plane.peers.contains_key(&new))
        .unwrap();
    s.partition(b, true);
    s.run_for(secs(25));
    s.partition(b, false);
    s.run_until(secs(60), |s| s.member(b).public_key() == new)
        .unwrap();
    assert!(s.member(b).ended.is_none());
    assert!(s
        .member(b)
        .plane
        .peers
        .contains_key(&s.member(a).public_key()));
}

#[test]
fn a_partition_that_heals() {
    let mut s = sim(7);
    let net = s.create_network("prod");
    let token = s.token(net, 20);
    let ids: Vec<_> = (0..4)
        .map(|i| s.join(&token, &format!("s{i}"), "web"))
        .collect();
    s.run_until(secs(5), |s| all_see_each_other(s, &ids))
        .unwrap();
    s.partition(ids[3], true);
    // While cut off, others come and go; it goes offline for its peers.
    let late = s.join(&token, "late", "web");
    s.remove_member(ids[2]);
    s.run_until(secs(60), |s| {
        state_at(s, ids[0], ids[3]) == Some(MemberState::Offline)
    })
    .unwrap();
    assert!(!sees(&s, ids[0], ids[3]));
    // Its own data plane kept the last map: it still has its old peers.
    assert!(sees(&s, ids[3], ids[0]));
    s.partition(ids[3], false);
    let took = s
        .run_until(secs(60), |s| {
            sees(s, ids[0], ids[3]) && sees(s, ids[3], late) && !sees(s, ids[3], ids[2])
        })
        .unwrap();
    // Reconnect backoff is at most 15 s.
    assert!(took <= secs(16), "healing took {took:?}");
    // `late` hears of it with its own latency.
    s.run_until(secs(1), |s| {
        state_at(s, late, ids[3]) == Some(MemberState::Online)
    });
    assert_eq!(state_at(&s, late, ids[3]), Some(MemberState::Online));
}

#[test]
fn resume_after_a_gap_longer_than_the_log_gets_a_snapshot() {
    let mut s = Sim::new(SimConfig {
        seed: 8,
        change_log: 4,
        ..SimConfig::default()
    });
    let net = s.create_network("prod");
    let token = s.token(net, 40);
    let a = s.join(&token, "a", "web");
    s.run_until(secs(5), |s| s.member(a).map().generation >= 1)
        .unwrap();
    s.kill(a);
    let others: Vec<_> = (0..10)
        .map(|i| s.join(&token, &format!("o{i}"), "web"))
        .collect();
    s.run_for(secs(2));
    s.restart(a);
    s.run_until(secs(5), |s| others.iter().all(|&o| sees(s, a, o)))
        .unwrap();
    let after_restart: Vec<&String> = s
        .trace()
        .iter()
        .skip_while(|l| !l.contains("m0 restarted"))
        .filter(|l| l.contains(" m0 "))
        .collect();
    assert!(
        after_restart.iter().any(|l| l.contains("snapshot")),
        "{after_restart:?}"
    );
    // A short gap is a delta.
    s.kill(a);
    let one = s.join(&token, "one-more", "web");
    s.run_for(secs(1));
    s.restart(a);
    s.run_until(secs(5), |s| sees(s, a, one)).unwrap();
    let last: Vec<&String> = s
        .trace()
        .iter()
        .rev()
        .take_while(|l| !l.contains("m0 restarted"))
        .filter(|l| l.contains(" m0 "))
        .collect();
    assert!(last.iter().any(|l| l.contains("m0 delta")), "{last:?}");
    assert!(!last.iter().any(|l| l.contains("snapshot")), "{last:?}");
}

#[test]
fn a_lagging_member_catches_up_from_the_log() {
    let mut s = Sim::new(SimConfig {
        seed: 9,
        push_buffer: 16,
        ..SimConfig::default()
    });
    let net = s.create_network("prod");
    let token = s.token(net, 100);
    let slow = s.join(&token, "slow", "web");
    s.run_until(secs(5), |s| s.member(slow).map().generation >= 1)
        .unwrap();
    // A slow link: the keyserver's pushes pile up past its buffer.
    s.set_link(slow, Duration::from_millis(400), 0.0);
    let others: Vec<_> = (0..60)
        .map(|i| s.join(&token, &format!("o{i}"), "web"))
        .collect();
    s.run_until(secs(30), |s| others.iter().all(|&o| sees(s, slow, o)))
        .unwrap();
    let map = s.member(slow).map().clone();
    assert_eq!(map, s.member(others[59]).map().clone(), "converged");
}

#[test]
fn loss_and_jitter_still_converge_and_networks_stay_apart() {
    let mut s = Sim::new(SimConfig {
        seed: 10,
        loss: 0.2,
        jitter: Duration::from_millis(50),
        ..SimConfig::default()
    });
    let mut by_net = vec![];
    for n in 0..3 {
        let net = s.create_network(&format!("net{n}"));
        let token = s.token(net, 50);
        let ids: Vec<_> = (0..15)
            .map(|i| {
                s.join(
                    &token,
                    &format!("svc{}", i % 4),
                    if i % 3 == 0 { "worker" } else { "web" },
                )
            })
            .collect();
        by_net.push(ids);
    }
    s.run_until(secs(60), |s| {
        by_net.iter().all(|ids| all_see_each_other(s, ids))
    })
    .unwrap();
    for (n, ids) in by_net.iter().enumerate() {
        for &id in ids {
            assert_eq!(s.member(id).plane.peers.len(), ids.len() - 1);
            for (m, others) in by_net.iter().enumerate() {
                if m != n {
                    assert!(others.iter().all(|&o| !sees(&s, id, o)), "isolation");
                }
            }
        }
    }
}

#[test]
fn a_thousand_members_converge_after_a_removal_and_an_offline() {
    let wall = Instant::now();
    let mut s = Sim::new(SimConfig {
        seed: 11,
        jitter: Duration::ZERO,
        ..SimConfig::default()
    });
    s.tracing = false;
    let net = s.create_network("big");
    let ids = s.populate(net, 1000, |i| format!("svc{}", i % 50));
    s.run_until(secs(10), |s| {
        ids.iter()
            .all(|&i| s.member(i).core.is_caught_up() && s.member(i).plane.peers.len() == 999)
    })
    .unwrap();
    let joined = wall.elapsed();
    let victim = ids[500];
    let key = s.member(victim).public_key();
    s.remove_member(victim);
    let removal = s
        .run_until(secs(10), |s| {
            ids.iter()
                .filter(|&&i| i != victim)
                .all(|&i| !s.member(i).plane.peers.contains_key(&key))
        })
        .unwrap();
    let stopped = ids[10];
    let key = s.member(stopped).public_key();
    s.stop(stopped);
    let offline = s
        .run_until(secs(10), |s| {
            ids.iter()
                .filter(|&&i| i != victim && i != stopped)
                .all(|&i| !s.member(i).plane.peers.contains_key(&key))
        })
        .unwrap();
    eprintln!(
        "1000 members: connected in {joined:?} wall; removal reached all in {removal:?} \
         virtual, offline in {offline:?} virtual; total wall {:?}",
        wall.elapsed()
    );
    assert!(removal < secs(1), "{removal:?}");
    assert!(offline < secs(1), "{offline:?}");
}

#[test]
fn same_seed_same_trace() {
    let run = |seed| {
        let mut s = Sim::new(SimConfig {
            seed,
            loss: 0.1,
            jitter: Duration::from_millis(20),
            ..SimConfig::default()
        });
        let net = s.create_network("prod");
        let token = s.token(net, 10);
        let ids: Vec<_> = (0..5)
            .map(|i| s.join(&token, &format!("s{i}"), "web"))
            .collect();
        s.run_for(secs(3));
        s.kill(ids[1]);
        s.stop(ids[2]);
        s.rotate(ids[3]);
        s.run_for(secs(40));
        s.restart(ids[1]);
        s.run_for(secs(5));
        s.trace().to_vec()
    };
    let (a, b, c) = (run(42), run(42), run(43));
    assert!(a.len() > 50, "a real trace: {}", a.len());
    assert_eq!(a, b, "same seed, same trace");
    assert_ne!(a, c, "another seed, another trace");
}

#[test]
fn key_lifetime_rotates_on_its_own() {
    let mut s = Sim::new(SimConfig {
        seed: 12,
        member: MemberConfig {
            key_lifetime: Some(secs(3600)),
            ..MemberConfig::default()
        },
        ..SimConfig::default()
    });
    let net = s.create_network("prod");
    let token = s.token(net, 10);
    let a = s.join(&token, "a", "web");
    let b = s.join(&token, "b", "web");
    s.run_until(secs(5), |s| all_see_each_other(s, &[a, b]))
        .unwrap();
    let first = s.member(a).public_key();
    s.run_until(secs(3700), |s| s.member(a).public_key() != first)
        .unwrap();
    s.run_until(secs(5), |s| all_see_each_other(s, &[a, b]))
        .unwrap();
}

#[test]
fn a_replica_dies_and_its_members_resume_on_another() {
    let mut s = Sim::new(SimConfig {
        seed: 11,
        replicas: 2,
        lifecycle: Lifecycle {
            offline_after: secs(30),
            expire_after: secs(120),
            ephemeral_after: None,
        },
        ..SimConfig::default()
    });
    let net = s.create_network("prod");
    let (via0, via1) = (s.token_at(net, 10, 0), s.token_at(net, 10, 1));
    let mut ids = Vec::new();
    for (i, svc) in ["web", "api", "db"].iter().enumerate() {
        ids.push(s.join(&via0, svc, "web"));
        ids.push(s.join(&via1, &format!("{svc}{i}"), "web"));
    }
    s.run_until(secs(5), |s| {
        all_see_each_other(s, &ids) && ids.iter().all(|&m| s.replica_of(m).is_some())
    })
    .expect("members on both replicas see each other");
    let on0: Vec<MemberId> = ids
        .iter()
        .copied()
        .filter(|&m| s.replica_of(m) == Some(0))
        .collect();
    assert_eq!(on0.len(), 3, "three members on each replica");
    let ips: Vec<_> = ids
        .iter()
        .map(|&m| s.member(m).core.welcome().unwrap().ip)
        .collect();
    s.run_for(secs(3));

    s.kill_replica(0);
    // Step by step: every member keeps every peer throughout (nobody is
    // taken offline while its replica's members move), and replica 0's
    // members are back in session on replica 1.
    let start = s.elapsed();
    let mut moved = None;
    while s.elapsed() < start + secs(60) {
        s.step();
        if !all_see_each_other(&s, &ids) {
            for l in s.trace() {
                eprintln!("{l}");
            }
        }
        assert!(
            all_see_each_other(&s, &ids),
            "a peer was lost during the failover at {:?}",
            s.elapsed()
        );
        if moved.is_none() && ids.iter().all(|&m| s.replica_of(m) == Some(1)) {
            moved = Some(s.elapsed() - start);
        }
        if moved.is_some_and(|t| s.elapsed() >= start + t + secs(40)) {
            break;
        }
    }
    let took = moved.expect("every member resumed on replica 1");
    eprintln!("failover: every member in session on replica 1 after {took:?}");
    // A heartbeat interval and its reply timeout, then a reconnection:
    // well before anyone would be taken offline (30 s).
    assert!(took < secs(25), "failover took {took:?}");
    for (i, &m) in ids.iter().enumerate() {
        let w = s.member(m).core.welcome().unwrap();
        assert_eq!(w.ip, ips[i], "member {m} kept its address");
        assert!(s.member(m).ended.is_none());
    }
    // The surviving replica holds each member once, online.
    let members = s.replica(1).members(net);
    assert_eq!(members.len(), ids.len(), "nothing lost or doubled");
    assert!(members
        .iter()
        .all(|m| m.member.state == MemberState::Online));

    // Changes after the failover reach everyone: a removal and a join.
    s.remove_member(ids[1]);
    let late = s.join(&via0, "late", "web");
    let rest: Vec<MemberId> = ids
        .iter()
        .copied()
        .filter(|&m| m != ids[1])
        .chain([late])
        .collect();
    s.run_until(secs(30), |s| {
        all_see_each_other(s, &rest) && rest.iter().all(|&m| !sees(s, m, ids[1]))
    })
    .expect("a removal and a join after the failover reach every member");
    assert_eq!(s.replica_of(late), Some(1), "the dead replica is skipped");
}
