//! Every error for bad policy input names the file, the object and the field, and one bad
//! object never stops the others from compiling.

use pipeguard::policy::{PolicyError, parse_policies};

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: ci\nspec:\n{spec}"
    )
}

fn egress(to_and_ports: &str) -> String {
    policy(&format!(
        "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - {to_and_ports}\n"
    ))
}

fn only_error(text: &str) -> PolicyError {
    let set = parse_policies("ci.yaml", text);
    assert!(set.policies.is_empty(), "expected no valid policy from:\n{text}");
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    set.errors.into_iter().next().unwrap()
}

#[track_caller]
fn assert_error(text: &str, field: &str, message: &str) {
    let e = only_error(text);
    assert_eq!(e.source, "ci.yaml");
    assert_eq!(e.object.as_deref(), Some("networkpolicy ci/p"), "{e}");
    assert_eq!(e.field.as_deref(), Some(field), "{e}");
    assert!(e.message.contains(message), "{e}");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("ci.yaml: networkpolicy ci/p: {field}: ")),
        "{shown}"
    );
}

#[test]
fn invalid_cidrs() {
    assert_error(
        &egress("to: [{ipBlock: {cidr: 10.0.0.0/33}}]"),
        "spec.egress[0].to[0].ipBlock.cidr",
        "invalid CIDR \"10.0.0.0/33\"",
    );
    assert_error(
        &egress("to: [{ipBlock: {cidr: not-a-cidr}}]"),
        "spec.egress[0].to[0].ipBlock.cidr",
        "invalid CIDR",
    );
    assert_error(
        &egress("to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]"),
        "spec.egress[0].to[0].ipBlock.except[0]",
        "is not strictly inside cidr 10.0.0.0/8",
    );
    assert_error(
        &egress("to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]"),
        "spec.egress[0].to[0].ipBlock.except[0]",
        "is not strictly inside",
    );
}

#[test]
fn invalid_ports() {
    let at = "spec.egress[0].ports[0]";
    assert_error(
        &egress("ports: [{endPort: 90}]"),
        &format!("{at}.endPort"),
        "endPort requires port",
    );
    assert_error(
        &egress("ports: [{port: 90, endPort: 80}]"),
        &format!("{at}.endPort"),
        "endPort 80 is less than port 90",
    );
    assert_error(
        &egress("ports: [{port: http, endPort: 80}]"),
        &format!("{at}.endPort"),
        "endPort cannot be used with named port",
    );
    assert_error(
        &egress("ports: [{protocol: ICMP, port: 1}]"),
        &format!("{at}.protocol"),
        "unknown protocol \"ICMP\"",
    );
    assert_error(
        &egress("ports: [{protocol: tcp, port: 1}]"),
        &format!("{at}.protocol"),
        "unknown protocol \"tcp\"",
    );
    assert_error(
        &egress("ports: [{port: 70000}]"),
        &format!("{at}.port"),
        "outside 1-65535",
    );
    assert_error(
        &egress("ports: [{port: 0}]"),
        &format!("{at}.port"),
        "outside 1-65535",
    );
    assert_error(
        &egress("ports: [{port: Not_A_Name}]"),
        &format!("{at}.port"),
        "not a valid port name",
    );
}

#[test]
fn invalid_selectors_and_types() {
    assert_error(
        &policy("  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [x]}]}\n"),
        "spec.podSelector.matchExpressions[0].operator",
        "unknown operator \"Equals\"",
    );
    assert_error(
        &egress("to: [{namespaceSelector: {matchExpressions: [{key: team, operator: In}]}}]"),
        "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values",
        "needs at least one value",
    );
    assert_error(
        &policy("  podSelector: {}\n  policyTypes: [Outbound]\n"),
        "spec.policyTypes[0]",
        "unknown policy type \"Outbound\"",
    );
    assert_error(
        &egress("to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]"),
        "spec.egress[0].to[0].ipBlock",
        "cannot be combined",
    );
}

#[test]
fn unknown_fields_and_wrong_types_name_the_path() {
    assert_error(
        &egress("to: [{ipBlock: {cidr: 10.0.0.0/8, exclude: []}}]"),
        "spec.egress[0].to[0].ipBlock.exclude",
        "unknown field `exclude`",
    );
    assert_error(
        &policy("  podSelector: {}\n  egres: []\n"),
        "spec.egres",
        "unknown field `egres`",
    );
    assert_error(
        &egress("ports: [{port: [80]}]"),
        "spec.egress[0].ports[0].port",
        "did not match any variant",
    );
    assert_error(
        &egress("to: {ipBlock: {cidr: 10.0.0.0/8}}"),
        "spec.egress[0].to",
        "expected sequence",
    );
}

#[test]
fn wrong_kind_version_and_missing_name() {
    let e = only_error("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: ci}\n");
    assert_eq!(e.field.as_deref(), Some("kind"));
    assert!(e.message.contains("unsupported kind \"ConfigMap\""), "{e}");
    assert_error(
        &policy("  podSelector: {}\n").replace("networking.k8s.io/v1", "networking.k8s.io/v1beta1"),
        "apiVersion",
        "expected networking.k8s.io/v1",
    );
    let e = only_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: ci}\nspec: {podSelector: {}}\n",
    );
    assert_eq!(e.field.as_deref(), Some("metadata.name"));
}

#[test]
fn yaml_syntax_errors_name_the_file() {
    let set = parse_policies("broken.yaml", "apiVersion: [unclosed\n");
    assert_eq!(set.errors.len(), 1);
    let shown = set.errors[0].to_string();
    assert!(shown.starts_with("broken.yaml"), "{shown}");
    assert!(shown.contains("YAML"), "{shown}");
}

#[test]
fn one_bad_object_leaves_the_others_compiling() {
    let good = egress("to: [{ipBlock: {cidr: 10.0.0.0/8}}]").replace("name: p", "name: good");
    let bad = egress("to: [{ipBlock: {cidr: 10.0.0.0/33}}]").replace("name: p", "name: bad");
    let set = parse_policies("two.yaml", &format!("{good}---\n{bad}"));
    assert_eq!(set.policies.len(), 1);
    assert_eq!(set.policies[0].name, "good");
    assert_eq!(set.errors.len(), 1);
    assert_eq!(set.errors[0].document, Some(2));
    assert!(
        set.errors[0]
            .to_string()
            .starts_with("two.yaml (document 2): networkpolicy ci/bad: ")
    );
}

/// An alias bomb where a string belongs is named by its field, not only refused as YAML.
#[test]
fn an_alias_bomb_is_named_by_its_field() {
    let mut text = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: bomb\n  namespace: ci\n  annotations:\n    a: &l0 [x,x,x,x,x,x,x,x,x,x]\n",
    );
    for i in 1..9 {
        let alias = format!("*l{}", i - 1);
        text += &format!("    a{i}: &l{i} [{}]\n", vec![alias; 10].join(","));
    }
    text += "spec:\n  podSelector: {}\n";
    let e = only_error(&text);
    assert_eq!(e.object.as_deref(), Some("networkpolicy ci/bomb"), "{e}");
    assert_eq!(e.field.as_deref(), Some("metadata.annotations.a"), "{e}");
}

/// Documents are cut at their markers and read one by one: a syntax error ends its own
/// document, not the policies after it.
#[test]
fn a_yaml_syntax_error_leaves_the_next_documents_compiling() {
    let good = egress("to: [{ipBlock: {cidr: 10.0.0.0/8}}]").replace("name: p", "name: good");
    let text = format!("apiVersion: [unclosed\n---\n{good}");
    let set = parse_policies("three.yaml", &text);
    assert_eq!(set.policies.len(), 1, "{:?}", set.errors);
    assert_eq!(set.policies[0].name, "good");
    assert_eq!(set.errors.len(), 1);
    assert_eq!(set.errors[0].document, Some(1));
    assert!(set.errors[0].to_string().contains("YAML"), "{}", set.errors[0]);
}

#[test]
fn ipv4_mapped_cidrs_are_enforced_as_ipv4_with_a_warning() {
    let set = parse_policies(
        "m.yaml",
        &egress("to: [{ipBlock: {cidr: \"::ffff:10.0.0.0/104\"}}]"),
    );
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    let warnings = &set.policies[0].warnings;
    assert!(
        warnings.iter().any(|w| w.contains("enforced as 10.0.0.0/8")),
        "{warnings:?}"
    );
}

/// A NetworkPolicy document is read straight from the text: its errors name the path once
/// and the place in the file.
#[test]
fn a_misspelled_field_names_its_path_once_and_its_line() {
    let e = only_error(&egress("to:\n    - ipBlok: {cidr: 10.0.0.0/8}"));
    assert_eq!(e.field.as_deref(), Some("spec.egress[0].to[0].ipBlok"), "{e}");
    assert!(e.message.starts_with("unknown field `ipBlok`"), "{e}");
    assert!(e.message.ends_with("at line 11, column 7"), "{e}");
}

/// A first document the quick pass cannot read (a scalar) and a list are still read whole,
/// and a valid policy after them still compiles.
#[test]
fn documents_of_every_shape_are_read() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}",
        policy("  podSelector: {}\n  policyTypes: [Egress]\n").replace('\n', "\n  ")
    );
    let text = format!(
        "just text\n---\n{list}\n---\n{}",
        policy("  podSelector: {}\n  policyTypes: [Egress]\n").replace("name: p", "name: q")
    );
    let set = parse_policies("ci.yaml", &text);
    let names: Vec<String> = set.policies.iter().map(|p| p.key()).collect();
    assert_eq!(names, ["ci/p", "ci/q"], "{:?}", set.errors);
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    assert_eq!(set.errors[0].document, Some(1));
}
