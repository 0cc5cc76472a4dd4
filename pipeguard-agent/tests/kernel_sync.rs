//! The agent's incremental sync against the real kernel: while allowlists change back and
//! forth as fast as the sync can write them, in place or under a fresh id, a destination
//! that neither allows is never reached, not even for a moment, and identical allowlists
//! share one policy id.

mod common;

use std::collections::BTreeMap;

use common::{listeners, probe_command, test_cgroup};
use pipeguard::{
    agent::{
        desired::{DesiredPod, LocalPod, Status},
        sync::Applied,
    },
    engine::{Engine, EngineConfig, PolicyEntries},
};
use pipeguard_common::{MODE_ENFORCE, PROTO_TCP, PortSet};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

fn only(cidr: &str, port: u16) -> PolicyEntries {
    common::allow_only(cidr, port, &[PROTO_TCP])
}

fn desired(cgroup_id: u64, entries: PolicyEntries) -> DesiredPod {
    DesiredPod {
        pod: LocalPod {
            uid: "u".into(),
            namespace: "ci".into(),
            name: "p".into(),
            labels: BTreeMap::new(),
            cgroup_id,
            escape: None,
        },
        entries,
        mode: MODE_ENFORCE,
        flags: 0,
        status: Status::Enforced(vec![]),
    }
}

/// Two allowlists; `never` (127.0.0.1) is in neither. The second allows all of 127/8
/// except a hole at 127.0.0.1: if the broad entry landed before its hole, or the hole went
/// before the broad entry, `never` would be reachable for a moment.
fn one_and_two(port: u16) -> (PolicyEntries, PolicyEntries) {
    let all = PortSet {
        flags: pipeguard_common::PORTS_ALL,
        ..PortSet::default()
    };
    // A thousand /24s of the same 127/8, none covering 127.0.0.1: changed in the wrong
    // order, they sit between the broad entry and its hole and hold the window open for
    // milliseconds, long enough for the hammer to get through.
    let fillers = (1..=4u8).flat_map(|b| (0..=249u8).map(move |c| format!("127.{b}.{c}.0/24")));
    let two = PolicyEntries {
        v4: [
            ("127.0.0.0/8".to_string(), all),
            ("127.0.0.1/32".to_string(), PortSet::default()),
        ]
        .into_iter()
        .chain(fillers.map(|f| (f, PortSet::default())))
        .map(|(net, ports)| (net.parse().unwrap(), ports))
        .collect(),
        ..PolicyEntries::default()
    };
    (only("127.0.0.2/32", port), two)
}

/// Runs a probe that hammers `never` from `cgroup` while `flip` runs 200 times; fails if
/// the probe ever got through.
fn hammer_while(cgroup: &std::path::Path, never: &listeners::Tcp, mut flip: impl FnMut(usize)) {
    let stop = std::env::temp_dir().join(format!("pg-hammer-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let mut hammer = probe_command(cgroup, &[format!("hammer {} {}", never.addr, stop.display())])
        .spawn()
        .unwrap();
    // A fixed amount of work, not a time budget: the hammer keeps going until told to stop.
    for i in 0..200 {
        flip(i);
    }
    std::fs::write(&stop, "").unwrap();
    let output = hammer.wait().unwrap();
    let _ = std::fs::remove_file(&stop);
    assert!(
        output.success(),
        "the hammer probe reached a destination no allowlist allows"
    );
    assert!(never.received.bytes().is_empty());
}

#[test]
fn changing_an_allowlist_in_place_never_opens_a_hole() {
    let never = listeners::tcp("127.0.0.1:0");
    let a = listeners::tcp("127.0.0.1:0");
    let cgroup = test_cgroup("sync-in-place");
    let mut engine = Engine::load(&EngineConfig::default()).expect("load");
    engine.attach(cgroup.path()).expect("attach");
    let id = cgroup.id().unwrap();
    let mut applied = Applied::default();
    let (one, two) = one_and_two(a.addr.port());
    applied.apply(&mut engine, &[desired(id, one.clone())]).unwrap();
    hammer_while(cgroup.path(), &never, |i| {
        let next = if i % 2 == 0 { &two } else { &one };
        let stats = applied.apply(&mut engine, &[desired(id, next.clone())]).unwrap();
        // The pod's only allowlist changes under its id: no pod write, no new id.
        assert_eq!(
            (stats.policies_updated, stats.policies_written, stats.pods_written),
            (1, 0, 0),
            "flip {i}: {stats:?}"
        );
    });
    assert_eq!(applied.policy_count(), 1);
}

#[test]
fn switching_a_pod_to_a_fresh_id_never_opens_a_hole() {
    let never = listeners::tcp("127.0.0.1:0");
    let a = listeners::tcp("127.0.0.1:0");
    let cgroup = test_cgroup("sync-fresh-id");
    let mut engine = Engine::load(&EngineConfig::default()).expect("load");
    engine.attach(cgroup.path()).expect("attach");
    let id = cgroup.id().unwrap();
    let mut applied = Applied::default();
    let (one, two) = one_and_two(a.addr.port());
    // Another pod keeps `one`, so the flipping pod cannot change it in place.
    const OTHER_POD: u64 = 1;
    let other = desired(OTHER_POD, one.clone());
    applied
        .apply(&mut engine, &[desired(id, one.clone()), other.clone()])
        .unwrap();
    hammer_while(cgroup.path(), &never, |i| {
        let next = if i % 2 == 0 { &two } else { &one };
        let stats = applied
            .apply(&mut engine, &[desired(id, next.clone()), other.clone()])
            .unwrap();
        assert_eq!(stats.policies_updated, 0, "flip {i}: {stats:?}");
        assert_eq!(stats.pods_written, 1, "flip {i}: {stats:?}");
    });
    assert_eq!(
        applied.policy_count(),
        1,
        "the old allowlist is deleted once unused"
    );
}

#[test]
fn identical_allowlists_share_one_policy_id() {
    let cgroup = test_cgroup("sync-share");
    let mut engine = Engine::load(&EngineConfig::default()).expect("load");
    let mut applied = Applied::default();
    let same = only("127.0.0.1/32", 80);
    let pods = [
        desired(101, same.clone()),
        desired(102, same.clone()),
        desired(103, only("10.0.0.0/8", 80)),
    ];
    let stats = applied.apply(&mut engine, &pods).unwrap();
    assert_eq!(stats.policies_written, 2);
    assert_eq!(stats.pods_written, 3);
    assert_eq!(applied.policy_count(), 2);
    // Re-applying the same state writes nothing.
    let again = applied.apply(&mut engine, &pods).unwrap();
    assert_eq!(again, Default::default());
    // Removing a pod deletes its entry, and its allowlist once nobody uses it.
    let stats = applied.apply(&mut engine, &pods[..2]).unwrap();
    assert_eq!((stats.pods_deleted, stats.policies_deleted), (1, 1));
    drop(cgroup);
}
