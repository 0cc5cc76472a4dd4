//! The agent's incremental sync against the real kernel: while allowlists change back and
//! forth as fast as the sync can write them, a destination that neither allows is never
//! reached, not even for a moment, and identical allowlists share one policy id.

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
        },
        entries,
        mode: MODE_ENFORCE,
        flags: 0,
        status: Status::Enforced(vec![]),
    }
}

#[test]
fn changing_allowlists_never_opens_a_hole() {
    let never = listeners::tcp("127.0.0.1:0");
    let a = listeners::tcp("127.0.0.1:0");
    let cgroup = test_cgroup("sync-hammer");
    let mut engine = Engine::load(&EngineConfig::default()).expect("load");
    engine.attach(cgroup.path()).expect("attach");
    let id = cgroup.id().unwrap();
    let mut applied = Applied::default();
    // Two allowlists; `never` (127.0.0.1, another port) is in neither. The second allows
    // all of 127/8 except a hole at 127.0.0.1: written in place, the broad entry would land
    // before its hole and open a window. The sync must never write in place.
    let one = only("127.0.0.1/32", a.addr.port());
    let all = PortSet {
        flags: pipeguard_common::PORTS_ALL,
        ..PortSet::default()
    };
    let two = PolicyEntries {
        v4: vec![
            ("127.0.0.0/8".parse().unwrap(), all),
            ("127.0.0.1/32".parse().unwrap(), PortSet::default()),
        ],
        v6: vec![],
    };
    applied.apply(&mut engine, &[desired(id, one.clone())]).unwrap();

    let stop = std::env::temp_dir().join(format!("pg-hammer-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let mut hammer = probe_command(
        cgroup.path(),
        &[format!("hammer {} {}", never.addr, stop.display())],
    )
    .spawn()
    .unwrap();
    // A fixed amount of work, not a time budget: the hammer keeps going until told to stop.
    for flip in 0..400 {
        let next = if flip % 2 == 0 { &two } else { &one };
        applied.apply(&mut engine, &[desired(id, next.clone())]).unwrap();
    }
    std::fs::write(&stop, "").unwrap();
    let output = hammer.wait().unwrap();
    let _ = std::fs::remove_file(&stop);
    assert!(
        output.success(),
        "the hammer probe reached a destination no allowlist allows"
    );
    assert!(never.received.bytes().is_empty());
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
