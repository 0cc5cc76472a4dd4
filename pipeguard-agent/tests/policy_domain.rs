//! DomainPolicy and ClusterDomainPolicy from files: what parses, what each error names
//! (file, object, field, exactly like NetworkPolicy errors), whom an invalid object makes
//! fail closed, and the warnings for public DNS-over-HTTPS resolvers.

use pipeguard::policy::{
    DomainPattern, DomainScope, PolicyError, PolicySet, Ports, TaintScope, load_policies, parse_policies,
};

fn domain_policy(spec: &str) -> String {
    format!(
        "apiVersion: pipeguard.dev/v1alpha1\nkind: DomainPolicy\nmetadata:\n  name: p\n  namespace: ci\nspec:\n{spec}"
    )
}

fn cluster_policy(spec: &str) -> String {
    format!(
        "apiVersion: pipeguard.dev/v1alpha1\nkind: ClusterDomainPolicy\nmetadata:\n  name: platform\nspec:\n{spec}"
    )
}

fn rule(domains_and_ports: &str) -> String {
    domain_policy(&format!(
        "  podSelector: {{}}\n  egress:\n  - {domains_and_ports}\n"
    ))
}

fn only_error(text: &str) -> (PolicyError, PolicySet) {
    let set = parse_policies("ci.yaml", text);
    assert!(set.domains.is_empty(), "expected no valid policy from:\n{text}");
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    (set.errors[0].clone(), set)
}

#[track_caller]
fn assert_error(text: &str, object: &str, field: &str, message: &str) {
    let (e, set) = only_error(text);
    assert_eq!(e.source, "ci.yaml");
    assert_eq!(e.object.as_deref(), Some(object), "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "{e}");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("ci.yaml: {object}: {field}: ")),
        "{shown}"
    );
    assert_eq!(
        set.domain_taints.len(),
        1,
        "every invalid domain policy taints someone"
    );
}

#[test]
fn a_typical_ci_policy_parses_and_normalizes() {
    let set = parse_policies(
        "ci.yaml",
        &domain_policy(
            "  podSelector: {matchLabels: {app: runner}}\n  egress:\n  - domains: [GitHub.com., '*.githubusercontent.com', registry.npmjs.org]\n    ports: [{port: 443}, {port: 8000, endPort: 8100, protocol: TCP}, {protocol: UDP}]\n  - domains: [pypi.org]\n",
        ),
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    let p = &set.domains[0];
    assert_eq!(p.key(), "DomainPolicy ci/p");
    assert_eq!(p.scope, DomainScope::Namespace("ci".into()));
    assert_eq!(
        p.egress[0].domains,
        vec![
            DomainPattern::Exact("github.com".into()),
            DomainPattern::Wildcard("githubusercontent.com".into()),
            DomainPattern::Exact("registry.npmjs.org".into()),
        ]
    );
    assert_eq!(
        p.egress[0].ports,
        Ports::List(vec![(6, 443, 443), (6, 8000, 8100), (17, 0, 65535)])
    );
    assert_eq!(p.egress[1].ports, Ports::All, "no ports: every port");
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn cluster_domain_policies_select_namespaces() {
    let set = parse_policies(
        "ci.yaml",
        &cluster_policy(
            "  namespaceSelector: {matchLabels: {team: ci}}\n  podSelector: {}\n  egress:\n  - domains: [ghcr.io]\n",
        ),
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!(set.domains[0].key(), "ClusterDomainPolicy platform");
    assert!(matches!(set.domains[0].scope, DomainScope::Cluster { .. }));
}

#[test]
fn invalid_names_name_the_field() {
    let object = "domainpolicy ci/p";
    let at = "spec.egress[0].domains[1]";
    for (name, message) in [
        ("'a..com'", "empty label"),
        ("'*'", "would allow every name"),
        ("'foo.*.com'", "only allowed as the whole first label"),
        ("'https://x.com'", "':' is not allowed"),
        ("10.1.2.3", "is an IP address"),
        ("bücher.example", "punycode (\"xn--bcher-kva.example\")"),
        ("''", "empty name"),
    ] {
        assert_error(
            &rule(&format!("domains: [github.com, {name}]")),
            object,
            at,
            message,
        );
    }
    let long = format!("{}.com", "a".repeat(64));
    assert_error(
        &rule(&format!("domains: [github.com, {long}]")),
        object,
        at,
        "longer than 63",
    );
    assert_error(
        &rule("domains: []"),
        object,
        "spec.egress[0].domains",
        "at least one name",
    );
}

#[test]
fn ports_follow_network_policy_rules_and_refuse_names() {
    let object = "domainpolicy ci/p";
    let at = "spec.egress[0].ports[0]";
    assert_error(
        &rule("domains: [a.com]\n    ports: [{port: https}]"),
        object,
        &format!("{at}.port"),
        "named port \"https\": the destination of a domain rule is not a pod",
    );
    assert_error(
        &rule("domains: [a.com]\n    ports: [{port: 443, endPort: 80}]"),
        object,
        &format!("{at}.endPort"),
        "endPort 80 is less than port 443",
    );
    assert_error(
        &rule("domains: [a.com]\n    ports: [{port: 70000}]"),
        object,
        &format!("{at}.port"),
        "outside 1-65535",
    );
    assert_error(
        &rule("domains: [a.com]\n    ports: [{port: 443, protocol: tcp}]"),
        object,
        &format!("{at}.protocol"),
        "unknown protocol \"tcp\"",
    );
}

#[test]
fn strict_structure_errors_name_the_path() {
    let object = "domainpolicy ci/p";
    assert_error(
        &rule("domains: [a.com]\n    to: [{ipBlock: {cidr: 10.0.0.0/8}}]"),
        object,
        "spec.egress[0].to",
        "unknown field `to`, expected `domains` or `ports`",
    );
    assert_error(
        &domain_policy("  podSelector: {}\n  ingress: []\n"),
        object,
        "spec.ingress",
        "unknown field `ingress`",
    );
    assert_error(
        &domain_policy("  egress: []\n"),
        object,
        "spec",
        "missing field `podSelector`",
    );
    assert_error(
        &rule("ports: [{port: 443}]"),
        object,
        "spec.egress[0]",
        "missing field `domains`",
    );
    assert_error(
        &domain_policy("  podSelector: {}\n  namespaceSelector: {}\n"),
        object,
        "spec.namespaceSelector",
        "select namespaces with a ClusterDomainPolicy",
    );
    assert_error(
        &domain_policy("  podSelector: {matchExpressions: [{key: a, operator: Equals}]}\n"),
        object,
        "spec.podSelector.matchExpressions[0].operator",
        "unknown operator",
    );
    assert_error(
        &domain_policy("  podSelector: {}\n").replace("v1alpha1", "v1"),
        object,
        "apiVersion",
        "expected pipeguard.dev/v1alpha1",
    );
    assert_error(
        &domain_policy("  podSelector: {}\n").replace("  name: p\n", ""),
        "domainpolicy ci/<no name>",
        "metadata.name",
        "missing name",
    );
}

#[test]
fn cluster_policy_errors_and_whom_they_fail_closed() {
    let object = "clusterdomainpolicy platform";
    assert_error(
        &cluster_policy("  podSelector: {}\n"),
        object,
        "spec.namespaceSelector",
        "missing",
    );
    assert_error(
        &cluster_policy("  namespaceSelector: {}\n  podSelector: {}\n")
            .replace("name: platform", "name: platform\n  namespace: ci"),
        object,
        "metadata.namespace",
        "cluster-scoped",
    );
    // Readable selectors: only the pods they select fail closed.
    let (_, set) = only_error(&cluster_policy(
        "  namespaceSelector: {matchLabels: {team: ci}}\n  podSelector: {matchLabels: {app: runner}}\n  egress:\n  - domains: ['bad name']\n",
    ));
    assert!(matches!(set.domain_taints[0].scope, TaintScope::Selected { .. }));
    assert_eq!(set.errors[0].namespace, None);
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let taint = &set.domain_taints[0];
    assert!(taint.covers("ci", &labels(&[("app", "runner")]), || labels(&[("team", "ci")])));
    assert!(!taint.covers("ci", &labels(&[("app", "web")]), || labels(&[("team", "ci")])));
    assert!(!taint.covers("web", &labels(&[("app", "runner")]), || labels(&[(
        "team", "web"
    )])));
    // An unreadable selector: every guarded pod fails closed.
    let (_, set) = only_error(&cluster_policy(
        "  namespaceSelector: {matchExpressions: [{key: team, operator: Equals}]}\n  podSelector: {}\n",
    ));
    assert_eq!(set.domain_taints[0].scope, TaintScope::AllGuarded);
    // A namespaced one: its namespace, and the error carries it like a NetworkPolicy's.
    let (e, set) = only_error(&rule("domains: ['*']"));
    assert_eq!(e.namespace.as_deref(), Some("ci"));
    assert_eq!(set.domain_taints[0].scope, TaintScope::Namespace("ci".into()));
}

#[test]
fn mixed_files_keep_every_good_object() {
    let text = format!(
        "{}---\n{}---\n{}---\n{}",
        rule("domains: [good.example]"),
        rule("domains: ['bad..example']").replace("name: p", "name: broken"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: 53, protocol: UDP}]\n",
        cluster_policy("  namespaceSelector: {}\n  podSelector: {}\n  egress:\n  - domains: [ghcr.io]\n"),
    );
    let set = parse_policies("ci.yaml", &text);
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.domains.len(), 2);
    assert_eq!(set.errors.len(), 1);
    assert_eq!(set.errors[0].document, Some(2));
    assert_eq!(set.errors[0].object.as_deref(), Some("domainpolicy ci/broken"));
    // `kubectl get domainpolicies -o yaml` writes a List.
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}",
        rule("domains: [a.example]").replace('\n', "\n  ")
    );
    let set = parse_policies("list.yaml", &list);
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!(set.domains.len(), 1);
}

#[test]
fn public_doh_resolvers_are_warned_about_with_file_and_object() {
    let set = parse_policies(
        "ci.yaml",
        &rule("domains: [github.com, dns.google, '*.quad9.net']"),
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    let warnings: Vec<&String> = set.warnings().collect();
    assert!(
        warnings.iter().any(
            |w| w.starts_with("ci.yaml: domainpolicy ci/p: spec.egress[0].domains[1]: ")
                && w.contains("DNS-over-HTTPS resolver dns.google")
        ),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("domains[2]") && w.contains("dns.quad9.net"))
    );
    assert!(!warnings.iter().any(|w| w.contains("domains[0]")), "{warnings:?}");
}

#[test]
fn directories_mix_both_kinds() {
    let dir = std::env::temp_dir().join(format!("pg-domain-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), rule("domains: [a.example]")).unwrap();
    std::fs::write(
        dir.join("b.yml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n, namespace: ci}\nspec: {podSelector: {}}\n",
    )
    .unwrap();
    let set = load_policies(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!((set.policies.len(), set.domains.len()), (1, 1));
}
