//! deploy/ is tested like code: every document parses into its Kubernetes type with no
//! field lost, RBAC is exactly the minimum, the DaemonSet has what the agent needs and
//! nothing more, and the example policies compile with pipeguard's own parser.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use pipeguard::policy::{Egress, PodIdentity, egress_for, load_policies};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

use serde::Deserialize;

/// Parses into `T` and back: a misspelled or misplaced field that the typed struct drops
/// shows up as a difference.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, file: &Path) -> T {
    let obj: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let back = serde_json::to_value(&obj).unwrap();
    assert_eq!(
        &back,
        doc,
        "{}: a field did not survive the round trip",
        file.display()
    );
    obj
}

fn all_manifests() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    for dir in [deploy(), deploy().join("examples")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .flat_map(|f| documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

fn find<T: DeserializeOwned + Serialize>(kind: &str) -> Vec<T> {
    all_manifests()
        .iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(f, d)| typed(d, f))
        .collect()
}

#[test]
fn every_document_is_a_known_kind_with_no_lost_fields() {
    let manifests = all_manifests();
    assert!(manifests.len() >= 12, "{} documents", manifests.len());
    for (file, doc) in &manifests {
        match doc["kind"].as_str().unwrap_or_default() {
            "Namespace" => drop(typed::<Namespace>(doc, file)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc, file)),
            "ClusterRole" => drop(typed::<ClusterRole>(doc, file)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc, file)),
            "ConfigMap" => drop(typed::<ConfigMap>(doc, file)),
            "DaemonSet" => drop(typed::<DaemonSet>(doc, file)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(doc, file)),
            other => panic!("{}: unexpected kind {other:?}", file.display()),
        }
    }
}

#[test]
fn kustomization_lists_exactly_the_resource_files() {
    let k = &documents(&deploy().join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
}

#[test]
fn rbac_is_minimal_and_bound_to_the_agent() {
    let roles: Vec<ClusterRole> = find("ClusterRole");
    assert_eq!(roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in roles[0].rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "wildcard in {rule:?}"
                    );
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            expected.insert((group.to_string(), "events".to_string(), verb.to_string()));
        }
    }
    assert_eq!(granted, expected);

    let bindings: Vec<ClusterRoleBinding> = find("ClusterRoleBinding");
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0].role_ref.name, roles[0].metadata.name.clone().unwrap());
    let subjects = bindings[0].subjects.clone().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        ("ServiceAccount", "pipeguard")
    );
    assert_eq!(subjects[0].namespace.as_deref(), Some("pipeguard-system"));
}

#[test]
fn the_daemonset_has_what_the_agent_needs_and_no_more() {
    let sets: Vec<DaemonSet> = find("DaemonSet");
    assert_eq!(sets.len(), 1);
    let pod = sets[0].spec.template.spec.clone().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("pipeguard"));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true), "not privileged");
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), vec!["ALL".to_string()]);
    let added: BTreeSet<String> = caps.add.unwrap().into_iter().collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN"].map(String::from).into());

    let volumes: BTreeMap<String, String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.host_path.expect("hostPath volumes only").path))
        .collect();
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| (m.mount_path, m.name))
        .collect();
    for path in ["/sys/fs/cgroup", "/sys/fs/bpf"] {
        let volume = mounts.get(path).unwrap_or_else(|| panic!("{path} not mounted"));
        assert_eq!(volumes[volume], path, "{path} comes from the host's {path}");
    }

    let env = c.env.clone().unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "PIPEGUARD_NODE_NAME")
        .expect("node name env");
    let field = node.value_from.clone().unwrap().field_ref.unwrap().field_path;
    assert_eq!(field, "spec.nodeName");
    let from = c.env_from.clone().unwrap();
    assert_eq!(from[0].config_map_ref.as_ref().unwrap().name, "pipeguard-config");

    let port = c
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .find(|p| p.container_port == 9440)
        .expect("port 9440");
    let port_name = port.name.unwrap();
    let probe = |p: Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.unwrap().http_get.unwrap();
        (get.path.unwrap(), get.port)
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        probe(c.liveness_probe.clone()),
        ("/healthz".into(), IntOrString::String(port_name.clone()))
    );
    assert_eq!(
        probe(c.readiness_probe.clone()),
        ("/readyz".into(), IntOrString::String(port_name))
    );

    let tolerations = pod.tolerations.unwrap();
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations
                .iter()
                .any(|t| t.effect.as_deref() == Some(effect) && t.operator.as_deref() == Some("Exists")),
            "tolerates {effect} taints"
        );
    }
    let resources = c.resources.clone().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());
    assert!(c.args.clone().unwrap().first().is_some_and(|a| a == "agent"));
}

#[test]
fn the_configmap_only_sets_flags_the_agent_reads() {
    let maps: Vec<ConfigMap> = find("ConfigMap");
    let known = [
        "PIPEGUARD_GUARD_NAMESPACES",
        "PIPEGUARD_GUARD_SELECTOR",
        "PIPEGUARD_MODE",
        "PIPEGUARD_UNKNOWN_PODS",
        "PIPEGUARD_DEFAULT_DENY_EGRESS",
        "PIPEGUARD_PIN_DIR",
        "PIPEGUARD_LISTEN",
        "PIPEGUARD_LOG",
        "PIPEGUARD_SYNC_DEADLINE",
        "PIPEGUARD_KERNEL_LOG_LEVEL",
    ];
    for key in maps[0].data.clone().unwrap().keys() {
        assert!(
            known.contains(&key.as_str()),
            "{key} is not a flag the agent reads"
        );
    }
}

#[test]
fn example_policies_compile_and_isolate_the_runner_pods() {
    for (file, namespace, label) in [
        (
            "arc-runner-egress.yaml",
            "arc-runners",
            "actions.github.com/scale-set-name",
        ),
        (
            "gitlab-runner-egress.yaml",
            "gitlab-runner",
            "job.runner.gitlab.com/id",
        ),
    ] {
        let set = load_policies(&[deploy().join("examples").join(file)]);
        assert!(set.errors.is_empty(), "{file}: {:?}", set.errors);
        assert_eq!(set.policies.len(), 3, "{file}");
        let runner = PodIdentity {
            namespace: namespace.into(),
            name: "runner-1".into(),
            labels: [(label.to_string(), "x".to_string())].into(),
        };
        let Egress::Isolated { policies, .. } = egress_for(&set, &runner, None) else {
            panic!("{file}: runner pods must be isolated")
        };
        assert_eq!(policies.len(), 3, "{file}: {policies:?}");
        let other = PodIdentity {
            namespace: namespace.into(),
            name: "web".into(),
            labels: BTreeMap::new(),
        };
        assert_eq!(
            egress_for(&set, &other, None),
            Egress::Unrestricted,
            "{file}: other pods are left alone"
        );
    }
}
