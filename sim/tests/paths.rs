//! Path selection on a virtual clock (issue 22): the real `PathManager`s
//! of two peers behind simulated NATs, with loss, jitter, rebinding, a
//! direct path that dies, relays that die, and a NAT that changes. Each
//! scenario asserts how long the direct path and the fallback take.

use std::time::Duration;

use meshlib::nat::path::{Path, PathConfig};
use meshsim::paths::{Filtering, Mapping, NatKind, PathSim, PathSimConfig};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn both_direct(sim: &PathSim) -> bool {
    sim.is_direct(0) && sim.is_direct(1)
}

/// Two home routers (port-restricted, port-preserving): the peers start on
/// the relay and go direct as soon as both have the other's candidates
/// and have probed once (their first pings open both NATs).
#[test]
fn easy_nats_go_direct_within_the_first_probes() {
    let mut sim = PathSim::new(
        PathSimConfig::default(),
        [Some(NatKind::easy()), Some(NatKind::easy())],
    );
    let took = sim
        .run_until_cond(secs(5.0), both_direct)
        .expect("direct path");
    // Candidates arrive after 50 ms; a blocked first ping, the other
    // side's ping answered at once: a few round trips of 20 ms.
    eprintln!("easy NATs: direct after {took:?}");
    assert!(took <= secs(0.3), "direct after {took:?}");
    assert_eq!(sim.trace()[0].path, Path::Relay, "{:?}", sim.trace());
    sim.run_until(secs(120.0));
    assert!(both_direct(&sim));
    // No flapping: each peer switched at most twice (relay, then direct).
    for peer in 0..2 {
        let n = sim.trace().iter().filter(|c| c.peer == peer).count();
        assert!(n <= 3, "peer {peer}: {:?}", sim.trace());
    }
}

/// 10% loss each way and jitter of ±8 ms on a 10 ms path (datagrams
/// reorder): the direct path is found within a few probe rounds and kept
/// for ten minutes: a lost heartbeat is retried within a quarter of the
/// heartbeat, so it never falls back to the relay.
#[test]
fn loss_and_jitter_neither_delay_nor_break_the_direct_path() {
    for seed in 1..=5 {
        let cfg = PathSimConfig {
            direct_loss: 0.10,
            relay_loss: 0.10,
            jitter: Duration::from_millis(8),
            seed,
            ..PathSimConfig::default()
        };
        let mut sim = PathSim::new(cfg, [Some(NatKind::easy()), Some(NatKind::easy())]);
        let took = sim
            .run_until_cond(secs(10.0), both_direct)
            .expect("direct path");
        // Probes every second for the first rounds: a few lost ones cost
        // a round or two.
        eprintln!("loss and jitter, seed {seed}: direct after {took:?}");
        assert!(took <= secs(3.0), "seed {seed}: direct after {took:?}");
        let since = sim.trace().len();
        sim.run_until(secs(600.0));
        let later: Vec<_> = sim.trace()[since..].to_vec();
        assert!(
            later.iter().all(|c| matches!(c.path, Path::Direct(_))),
            "seed {seed}: left the direct path: {later:?}"
        );
        assert!(sim.dropped > 0, "loss happened");
    }
}

/// The direct path dies (a firewall starts dropping UDP between the two
/// sites): both fall back to the relay once the path's trust runs out
/// (2.5 s after its last answer), and go back to direct once it heals,
/// at the next probe (every 10 s while on the relay after the fast
/// rounds).
#[test]
fn a_direct_path_that_dies_falls_back_then_comes_back() {
    let cfg = PathSimConfig::default();
    let trust = cfg.path.trust;
    let mut sim = PathSim::new(cfg, [Some(NatKind::easy()), Some(NatKind::easy())]);
    sim.run_until_cond(secs(5.0), both_direct).expect("direct");
    sim.run_until(secs(30.0));
    sim.block_direct(true);
    let fell = sim
        .run_until_cond(secs(10.0), |s| {
            s.path(0) == Path::Relay && s.path(1) == Path::Relay
        })
        .expect("fell back to the relay");
    eprintln!("direct path died: relay after {fell:?}");
    // Last answer at most one heartbeat (1 s) before the block.
    assert!(
        fell <= trust + secs(1.0) && fell >= trust - secs(1.0),
        "fell back after {fell:?}"
    );
    // Healed after a minute on the relay: the slow probes (10 s) find it.
    sim.run_until(secs(100.0));
    assert_eq!(sim.path(0), Path::Relay);
    sim.block_direct(false);
    let back = sim
        .run_until_cond(secs(30.0), both_direct)
        .expect("direct again");
    eprintln!("direct path healed: direct after {back:?}");
    let slow = PathConfig::default().probe_slow;
    assert!(back <= slow + secs(0.5), "direct again after {back:?}");
}

/// Peer 0's NAT restarts and gives its socket a new port. Peer 1's
/// port-restricted NAT lets nothing from that new port in until peer 1
/// sends to it, and peer 1 learns it only from peer 0's new STUN answer:
/// peer 0 asks STUN again as soon as its direct path is lost, so the
/// direct path comes back a few seconds after the rebinding (its trust,
/// then a map push and a probe), carried by the relay meanwhile.
#[test]
fn a_nat_rebinding_is_followed_within_seconds() {
    let cfg = PathSimConfig::default();
    let trust = cfg.path.trust;
    let mut sim = PathSim::new(cfg, [Some(NatKind::easy()), Some(NatKind::easy())]);
    sim.run_until_cond(secs(5.0), both_direct).expect("direct");
    sim.run_until(secs(30.0));
    let before = sim.path(1);
    sim.rebind(0);
    let since = sim.trace().len();
    let back = sim
        .run_until_cond(secs(40.0), |s| both_direct(s) && s.path(1) != before)
        .unwrap_or_else(|| panic!("not direct again: {:#?}", sim.trace()));
    eprintln!("rebinding: direct again after {back:?}");
    assert!(back <= trust + secs(2.5), "direct again after {back:?}");
    // Never without a path meanwhile: the relay carried it.
    for c in &sim.trace()[since..] {
        assert!(
            matches!(c.path, Path::Direct(_) | Path::Relay),
            "{:?}",
            sim.trace()
        );
    }
}

/// Both behind symmetric port-restricted NATs: no direct path exists, the
/// relay carries everything. The relay dies; the peers notice after 3 s
/// and move to the second relay 1 s later: the relayed path is back 4 s
/// after the death, and no direct path is ever claimed.
#[test]
fn a_relay_that_dies_hands_over_to_the_second_relay() {
    let cfg = PathSimConfig::default();
    let outage = cfg.relay_detect + cfg.relay_reconnect;
    let mut sim = PathSim::new(
        cfg,
        [Some(NatKind::symmetric()), Some(NatKind::symmetric())],
    );
    sim.run_until(secs(60.0));
    assert_eq!((sim.path(0), sim.path(1)), (Path::Relay, Path::Relay));
    sim.kill_relay(0);
    let back = sim
        .run_until_cond(secs(30.0), |s| {
            s.relay_of(0) == Some(1)
                && s.relay_of(1) == Some(1)
                && s.path(0) == Path::Relay
                && s.path(1) == Path::Relay
        })
        .expect("relayed again through the second relay");
    eprintln!("relay died: relayed again after {back:?}");
    assert!(back <= outage + secs(0.1), "relayed again after {back:?}");
    // Meanwhile the path was blind (no relay, no answer), never direct.
    sim.run_until(secs(200.0));
    assert!(
        sim.trace()
            .iter()
            .all(|c| !matches!(c.path, Path::Direct(_))),
        "{:?}",
        sim.trace()
    );
    assert_eq!((sim.path(0), sim.path(1)), (Path::Relay, Path::Relay));
}

/// Peer 0 behind a symmetric NAT, peer 1 behind a port-restricted one: the
/// relay. Then peer 0's NAT turns endpoint-independent and
/// port-preserving (a reconfigured router): its next STUN answer (every
/// 20 s) advertises the new mapping, and the direct path follows within
/// one probe round of the map push.
#[test]
fn a_symmetric_nat_that_turns_port_preserving_goes_direct() {
    let cfg = PathSimConfig::default();
    let stun_every = cfg.stun_every;
    let mut sim = PathSim::new(cfg, [Some(NatKind::symmetric()), Some(NatKind::easy())]);
    sim.run_until(secs(45.0));
    assert_eq!((sim.path(0), sim.path(1)), (Path::Relay, Path::Relay));
    sim.set_nat(
        0,
        NatKind {
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressPort,
            port_preserving: true,
        },
    );
    let took = sim
        .run_until_cond(secs(60.0), both_direct)
        .expect("direct once the NAT allows it");
    eprintln!("symmetric turned port-preserving: direct after {took:?}");
    assert!(took <= stun_every + secs(1.5), "direct after {took:?}");
}

/// The same seed gives the same trace.
#[test]
fn the_same_seed_gives_the_same_trace() {
    let run = || {
        let cfg = PathSimConfig {
            direct_loss: 0.2,
            jitter: Duration::from_millis(5),
            seed: 9,
            ..PathSimConfig::default()
        };
        let mut sim = PathSim::new(cfg, [Some(NatKind::easy()), None]);
        sim.run_until(secs(120.0));
        (sim.trace().to_vec(), sim.sent, sim.dropped)
    };
    assert_eq!(run(), run());
}
