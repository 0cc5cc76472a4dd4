//! What the loaders accept besides plain manifests: defaulted policyTypes, `kind: List`
//! exports, host bits and the warnings that say how accepted input is enforced, cluster
//! snapshots and the errors they produce.

use std::{collections::BTreeMap, path::PathBuf};

use pipeguard::policy::{
    Egress, MAX_CLUSTER_BYTES, NAMESPACE_NAME_LABEL, PodIdentity, cluster_from_str, egress_for, evaluate,
    load_cluster, load_policies, parse_policies,
};
use pipeguard_common::{PROTO_TCP, PROTO_UDP};

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: ci\nspec:\n{spec}"
    )
}

fn job() -> PodIdentity {
    PodIdentity {
        namespace: "ci".into(),
        name: "job".into(),
        labels: BTreeMap::new(),
    }
}

/// A scratch directory removed on drop, even when the test fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pg-inputs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_empty_policy_types_list_is_defaulted_like_an_absent_one() {
    // The API server defaults `len(policyTypes) == 0`: Ingress, plus Egress when egress
    // rules are present.
    let set = parse_policies(
        "p.yaml",
        &policy(
            "p",
            "  podSelector: {}\n  policyTypes: []\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]\n",
        ),
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert!(set.policies[0].ingress.is_some(), "Ingress is always defaulted");
    let Egress::Isolated { rules, .. } = egress_for(&set, &job(), None) else {
        panic!("egress rules imply Egress");
    };
    assert!(evaluate(&rules, "10.1.2.3".parse().unwrap(), PROTO_TCP, 1));
    assert!(!evaluate(&rules, "11.1.2.3".parse().unwrap(), PROTO_TCP, 1));
}

#[test]
fn egress_empty_list_without_policy_types_does_not_isolate_egress() {
    let set = parse_policies("p.yaml", &policy("p", "  podSelector: {}\n  egress: []\n"));
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!(egress_for(&set, &job(), None), Egress::Unrestricted);
    let set = parse_policies(
        "p.yaml",
        &policy("p", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: []\n"),
    );
    let Egress::Isolated { rules, policies, .. } = egress_for(&set, &job(), None) else {
        panic!("an explicit Egress type isolates");
    };
    assert!(rules.is_empty(), "egress: [] denies everything");
    assert_eq!(policies, ["ci/p"]);
}

#[test]
fn host_bits_are_cleared_with_a_warning_naming_file_object_and_field() {
    let set = parse_policies(
        "ci.yaml",
        &policy(
            "hosts",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.1/8, except: [10.1.0.1/16]}}]}]\n",
        ),
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    let warnings = &set.policies[0].warnings;
    assert_eq!(
        warnings,
        &[
            "ci.yaml: networkpolicy ci/hosts: spec.egress[0].to[0].ipBlock.cidr: 10.0.0.1/8 has host bits set; enforced as 10.0.0.0/8",
            "ci.yaml: networkpolicy ci/hosts: spec.egress[0].to[0].ipBlock.except[0]: 10.1.0.1/16 has host bits set; enforced as 10.1.0.0/16",
        ]
    );
    let Egress::Isolated { rules, warnings, .. } = egress_for(&set, &job(), None) else {
        panic!("isolated");
    };
    assert_eq!(warnings.len(), 2, "the pod's warnings carry the policy's");
    assert!(evaluate(&rules, "10.200.0.1".parse().unwrap(), PROTO_TCP, 1));
    assert!(!evaluate(&rules, "10.1.9.9".parse().unwrap(), PROTO_TCP, 1));
}

#[test]
fn the_whole_mapped_range_is_all_of_ipv4() {
    let set = parse_policies(
        "m.yaml",
        &policy(
            "mapped",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: \"::ffff:0:0/96\"}}]}]\n",
        ),
    );
    let Egress::Isolated { rules, warnings, .. } = egress_for(&set, &job(), None) else {
        panic!("isolated");
    };
    assert_eq!(rules[0].cidr.to_string(), "0.0.0.0/0");
    assert!(
        warnings[0].ends_with("::ffff:0:0/96 is IPv4-mapped IPv6; enforced as 0.0.0.0/0"),
        "{warnings:?}"
    );
    assert!(evaluate(&rules, "192.0.2.1".parse().unwrap(), PROTO_UDP, 53));
    assert!(!evaluate(&rules, "2001:db8::1".parse().unwrap(), PROTO_UDP, 53));
}

#[test]
fn named_ports_and_selector_peers_warn_without_a_cluster() {
    let set = parse_policies(
        "p.yaml",
        &policy(
            "named",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: http}]\n  - to: [{podSelector: {}}]\n",
        ),
    );
    let Egress::Isolated { rules, warnings, .. } = egress_for(&set, &job(), None) else {
        panic!("isolated");
    };
    assert!(rules.is_empty(), "{rules:?}");
    assert_eq!(
        warnings,
        [
            "ci/named: named port \"http\" matches nothing without a cluster snapshot (--cluster)",
            "ci/named: a podSelector/namespaceSelector peer matches nothing without a cluster snapshot (--cluster)",
        ]
    );
}

#[test]
fn kubectl_list_exports_are_read_item_by_item() {
    let good = policy(
        "good",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{}]\n",
    );
    let bad = policy("bad", "  podSelector: {}\n  egress: [{ports: [{port: 0}]}]\n");
    let indent = |doc: &str| {
        doc.lines()
            .enumerate()
            .map(|(i, l)| format!("{}{l}\n", if i == 0 { "- " } else { "  " }))
            .collect::<String>()
    };
    let list = format!(
        "apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n{}{}",
        indent(&good),
        indent(&bad)
    );
    let set = parse_policies("export.yaml", &list);
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.policies[0].name, "good");
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    assert_eq!(
        set.errors[0].to_string(),
        "export.yaml: networkpolicy ci/bad: spec.egress[0].ports[0].port: port 0 is outside 1-65535"
    );
    let empty = parse_policies(
        "empty.yaml",
        "apiVersion: v1\nkind: NetworkPolicyList\nitems: []\n",
    );
    assert!(
        empty.policies.is_empty() && empty.errors.is_empty(),
        "{:?}",
        empty.errors
    );
}

#[test]
fn directories_are_read_recursively_in_order_and_io_errors_name_the_path() {
    let dir = Scratch::new("dirs");
    std::fs::create_dir_all(dir.0.join("b/nested")).unwrap();
    std::fs::write(
        dir.0.join("b/nested/two.yml"),
        policy("two", "  podSelector: {}\n"),
    )
    .unwrap();
    std::fs::write(dir.0.join("a.yaml"), policy("one", "  podSelector: {}\n")).unwrap();
    std::fs::write(dir.0.join("notes.txt"), "not yaml: [").unwrap();
    let missing = dir.0.join("missing.yaml");
    let set = load_policies(&[dir.0.clone(), missing.clone()]);
    let names: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["one", "two"], "sorted, recursive, *.yaml and *.yml only");
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    assert!(
        set.errors[0]
            .to_string()
            .starts_with(&format!("{}: ", missing.display())),
        "{}",
        set.errors[0]
    );
}

#[test]
fn oversized_files_are_refused_whole() {
    let dir = Scratch::new("big");
    let file = dir.0.join("big.yaml");
    let padding = format!("# {}\n", "x".repeat(1 << 20));
    std::fs::write(&file, padding.repeat(5)).unwrap();
    let set = load_policies(std::slice::from_ref(&file));
    assert!(set.policies.is_empty());
    assert_eq!(set.errors.len(), 1);
    assert!(
        set.errors[0].to_string().contains("the limit is 4194304"),
        "{}",
        set.errors[0]
    );

    let f = std::fs::File::create(&file).unwrap();
    f.set_len(MAX_CLUSTER_BYTES + 1).unwrap();
    let err = load_cluster(&file).unwrap_err();
    assert!(err.to_string().contains("the limit is"), "{err}");
}

const SNAPSHOT: &str = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: svc, labels: {team: platform}}
- apiVersion: v1
  kind: Pod
  metadata: {name: api, namespace: svc, labels: {app: api}, uid: 0b5c}
  spec:
    containers:
    - name: api
      image: api
      ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}, {containerPort: 9}]
  status: {podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}, {ip: \"fd00::1\"}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, namespace: other}
status: {}
";

#[test]
fn cluster_snapshots_read_lists_ports_and_both_families() {
    let cluster = cluster_from_str("cluster.yaml", SNAPSHOT).unwrap();
    assert_eq!(cluster.pods.len(), 2);
    let api = &cluster.pods[0];
    assert_eq!(
        api.ips,
        [
            "10.1.0.1".parse::<std::net::IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
    assert_eq!(
        api.named_ports,
        [
            ("http".to_string(), PROTO_TCP, 8080),
            ("dns".to_string(), PROTO_UDP, 53)
        ],
        "unnamed ports are not named ports; protocol defaults to TCP"
    );
    assert_eq!(
        cluster.namespace_labels("svc"),
        BTreeMap::from([
            ("team".to_string(), "platform".to_string()),
            (NAMESPACE_NAME_LABEL.to_string(), "svc".to_string())
        ])
    );
    assert_eq!(
        cluster.namespaces.get("other"),
        Some(&BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            "other".to_string()
        )])),
        "a namespace only pods mention still exists, with its name label"
    );
    assert!(cluster.pods[1].ips.is_empty());
}

#[test]
fn cluster_snapshot_errors_name_file_document_object_and_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nstatus: {podIP: 10.0.0.300}\n",
            "c.yaml (document 1): pod x/p: status.podIP: invalid IP address \"10.0.0.300\"",
        ),
        (
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{name: web, containerPort: 80, protocol: ICMP}]}]}\n",
            "c.yaml (document 2): pod default/p: spec.containers[0].ports[0].protocol: unknown protocol \"ICMP\"",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec: {containers: [{name: c, ports: [{name: web, containerPort: 70000}]}]}\n",
            "c.yaml (document 1): pod x/p: spec.containers[0].ports[0].containerPort: port 70000 is outside 1-65535",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}\n",
            "c.yaml (document 1): pod x/p: spec.containers[0].ports[0].containerPort: invalid type",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
            "c.yaml (document 1): object s: kind: unsupported kind \"Service\" in a cluster snapshot",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n",
            "c.yaml (document 1): namespace <no name>: metadata.name: missing name",
        ),
        ("kind: [unclosed\n", "c.yaml (document 1): YAML: "),
    ];
    for (text, expected) in cases {
        let err = cluster_from_str("c.yaml", text).unwrap_err();
        assert!(
            err.to_string().starts_with(expected),
            "{err}\nexpected: {expected}"
        );
    }
}
