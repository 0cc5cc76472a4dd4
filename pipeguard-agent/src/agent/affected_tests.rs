//! Incremental == full: after any sequence of pod, namespace and policy changes, recomputing
//! only the pods `affected` names (keeping the others' last result) gives every local pod
//! what computing all of them from a snapshot rebuilt from scratch gives.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;
use crate::{
    agent::{
        guard::GuardConfig,
        world::{PodKey, PodRecord, World},
    },
    job::Mode,
    policy::parse_policies,
};

const NAMESPACES: [&str; 4] = ["ci", "n1", "n2", "n3"];

/// Each policy in two versions (the second selects or reaches differently); the first one
/// also in an invalid version (its namespace fails closed).
const POLICIES: [[&str; 2]; 6] = [
    [
        "metadata: {name: p0, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: b}}}]\n    ports: [{port: 80}]\n",
        "metadata: {name: p0, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: c}}}]\n",
    ],
    [
        "metadata: {name: p1, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {team: x}}, podSelector: {matchLabels: {app: b}}}]\n",
        "metadata: {name: p1, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}}]\n",
    ],
    [
        "metadata: {name: p2, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/25}}]\n    ports: [{port: http}]\n",
        "metadata: {name: p2, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: http}, {port: 53, protocol: UDP}]\n",
    ],
    [
        "metadata: {name: p3, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: y}}}]\n    ports: [{port: http}]\n",
        "metadata: {name: p3, namespace: ci}\nspec:\n  podSelector: {matchLabels: {app: c}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{podSelector: {}}]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}}]\n",
    ],
    [
        "metadata: {name: p4, namespace: n1}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: c}}, namespaceSelector: {matchLabels: {team: y}}}]\n",
        "metadata: {name: p4, namespace: n1}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {}}]\n    ports: [{port: http}]\n",
    ],
    [
        "metadata: {name: p5, namespace: n2}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: a}}}]\n",
        "metadata: {name: p5, namespace: n2}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Egress]\n  egress: []\n",
    ],
];

const INVALID_P0: &str = "metadata: {name: p0, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/33}}]\n";

#[derive(Clone, Debug)]
enum Event {
    Pod {
        ns: usize,
        name: u8,
        app: u8,
        ip: Option<u8>,
        http: Option<u16>,
        local: bool,
    },
    DeletePod {
        ns: usize,
        name: u8,
    },
    Namespace {
        ns: usize,
        team: Option<u8>,
    },
    /// Policy `which` absent (0), in version 1 or 2, or invalid (3, p0 only).
    Policy {
        which: usize,
        version: u8,
    },
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (0..4usize, 0..6u8, 0..4u8, proptest::option::of(0..=255u8), proptest::option::of(prop_oneof![Just(8080u16), Just(9090u16)]), any::<bool>())
            .prop_map(|(ns, name, app, ip, http, local)| Event::Pod { ns, name, app, ip, http, local }),
        1 => (0..4usize, 0..6u8).prop_map(|(ns, name)| Event::DeletePod { ns, name }),
        1 => (0..4usize, proptest::option::of(0..2u8)).prop_map(|(ns, team)| Event::Namespace { ns, team }),
        1 => (0..POLICIES.len(), 0..4u8).prop_map(|(which, version)| Event::Policy { which, version }),
    ]
}

fn settings() -> Settings {
    Settings {
        guard: GuardConfig {
            namespaces: vec!["ci".into(), "n1".into(), "n2".into()],
            selector: None,
            runner_labels: false,
        },
        default_deny_egress: false,
        default_deny_ingress: false,
        ingress_from_node: Vec::new(),
        mode: Mode::Enforce,
        refuse_privileged: false,
    }
}

fn policy_set(versions: &[u8]) -> PolicySet {
    let docs: Vec<String> = versions
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let body = match (i, v) {
                (_, 0) => return None,
                (0, 3) => INVALID_P0,
                (_, v) => POLICIES[i][usize::from(*v - 1).min(1)],
            };
            Some(format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{body}"
            ))
        })
        .collect();
    parse_policies("test.yaml", &docs.join("---\n"))
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// The pod as the watch gives it, and as a from-scratch snapshot has it.
fn record(ns: &str, name: &str, app: u8, ip: Option<u8>, http: Option<u16>, local: bool) -> PodRecord {
    // app 3: an ARC workflow pod of p0 (selected with p0's labels when p0 is local).
    let pod_labels = match app {
        3 => labels(&[("runner-pod", "p0".to_string())]),
        _ => labels(&[("app", ["a", "b", "c"][usize::from(app)].to_string())]),
    };
    let uid = format!("uid-{ns}-{name}");
    let peer = ip.map(|ip| ClusterPod {
        namespace: ns.into(),
        name: name.into(),
        labels: pod_labels.clone(),
        ips: vec![std::net::IpAddr::from([10, 0, 0, ip])],
        named_ports: http.map(|p| ("http".to_string(), 6, p)).into_iter().collect(),
    });
    let object = local.then(|| {
        let mut pod = k8s_openapi::api::core::v1::Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some(ns.into());
        pod.metadata.uid = Some(uid.clone());
        pod.metadata.labels = Some(pod_labels);
        std::sync::Arc::new(pod)
    });
    PodRecord {
        uid: Some(uid),
        peer,
        local: object,
    }
}

fn local_pods(world: &World) -> Vec<LocalPod> {
    world
        .scheduled
        .iter()
        .enumerate()
        .map(|(i, (uid, p))| LocalPod {
            uid: uid.clone(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            labels: p.labels.clone(),
            cgroup_id: 100 + i as u64,
            escape: None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn recomputing_only_affected_pods_equals_recomputing_all(
        batches in proptest::collection::vec(proptest::collection::vec(event(), 1..4), 1..25)
    ) {
        let settings = settings();
        let none = HashMap::new();
        let mut world = World::default();
        // The reference: plain maps, rebuilt into a snapshot at every step.
        let mut pods: BTreeMap<PodKey, ClusterPod> = BTreeMap::new();
        let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut versions = vec![1u8; POLICIES.len()];
        let mut policies = policy_set(&versions);
        let mut previous: Vec<DesiredPod> = Vec::new();
        let mut deps = HashMap::new();
        for batch in batches {
            let mut deltas = Vec::new();
            let mut namespace_deltas = Vec::new();
            let mut policy_namespaces = BTreeSet::new();
            for event in batch {
                match event {
                    Event::Pod { ns, name, app, ip, http, local } => {
                        let (ns, name) = (NAMESPACES[ns].to_string(), format!("p{name}"));
                        let record = record(&ns, &name, app, ip, http, local);
                        let key = (ns, name);
                        match &record.peer {
                            Some(peer) => pods.insert(key.clone(), peer.clone()),
                            None => pods.remove(&key),
                        };
                        deltas.push(world.apply_pod(key, Some(record)));
                    }
                    Event::DeletePod { ns, name } => {
                        let key = (NAMESPACES[ns].to_string(), format!("p{name}"));
                        pods.remove(&key);
                        deltas.push(world.apply_pod(key, None));
                    }
                    Event::Namespace { ns, team } => {
                        let name = NAMESPACES[ns];
                        let new = team.map(|t| labels(&[("team", ["x", "y"][usize::from(t)].to_string())]));
                        match &new {
                            Some(l) => namespaces.insert(name.to_string(), l.clone()),
                            None => namespaces.remove(name),
                        };
                        let (old, new) = world.set_namespace(name, new);
                        if old != new {
                            namespace_deltas.push((name.to_string(), old, new));
                        }
                    }
                    Event::Policy { which, version } => {
                        versions[which] = if which == 0 { version } else { version % 3 };
                        policy_namespaces.insert(if which == 4 { "n1" } else if which == 5 { "n2" } else { "ci" }.to_string());
                    }
                }
            }
            // As the loop does it: affected against the policies before the change, then
            // the new set and every pod's dependencies in it.
            let hit = affected(
                &Changes { pods: &deltas, namespaces: &namespace_deltas, policy_namespaces: &policy_namespaces },
                &policies,
                &world.cluster,
                previous.iter().map(|d| &d.pod),
                &deps,
            );
            if !policy_namespaces.is_empty() {
                policies = policy_set(&versions);
                let pods: Vec<LocalPod> = previous.iter().map(|d| d.pod.clone()).collect();
                deps = all_dependencies(&policies, &pods);
            }
            let local = local_pods(&world);
            let (incremental, _) = merge(
                &settings, &policies, &world.cluster, &local,
                |pod| hit.contains(&pod.uid), std::mem::take(&mut previous), &none, &mut deps,
            );
            let mut snapshot = Cluster::default();
            for (name, l) in &namespaces {
                snapshot.add_namespace(name, l.clone());
            }
            snapshot.pods = pods.values().cloned().collect();
            let full = desired::compute(&settings, &policies, &snapshot, &local, &none);
            prop_assert_eq!(incremental.len(), full.len());
            for (i, f) in incremental.iter().zip(&full) {
                prop_assert_eq!(&i.pod, &f.pod);
                prop_assert_eq!(&i.status, &f.status, "pod {}", f.pod.uid);
                prop_assert_eq!(&i.entries, &f.entries, "pod {}", f.pod.uid);
                prop_assert_eq!(i.flags, f.flags);
            }
            previous = incremental;
        }
    }
}
