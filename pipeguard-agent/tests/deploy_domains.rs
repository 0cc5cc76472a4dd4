//! deploy/crds.yaml and the domain policy examples: both CRDs are structural and serve
//! pipeguard.dev/v1alpha1 with the right scope; every example object (and the README's)
//! passes the CRD's schema as the API server would check it (types, required fields,
//! enums, bounds, the name pattern, no field the server would prune) and pipeguard's own
//! parser; the name pattern in the schema never admits a name the parser's syntax rules
//! refuse; the examples select the runner pods they are written for and nothing else.

use std::path::{Path, PathBuf};

use pipeguard::policy::{PodIdentity, domains_for, parse_policies};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn crds() -> Vec<Value> {
    documents(&std::fs::read_to_string(repo().join("deploy/crds.yaml")).unwrap())
}

fn crd(kind: &str) -> Value {
    crds()
        .into_iter()
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn schema(kind: &str) -> Value {
    let crd = crd(kind);
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["name"], "v1alpha1");
    versions[0]["schema"]["openAPIV3Schema"].clone()
}

/// The problems the API server would find in `value` under `schema` (a subset of OpenAPI
/// v3 validation: what these CRDs use). Unknown fields are problems: the server would
/// prune them silently.
fn check(schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let ty = schema["type"].as_str().unwrap_or("<none>");
    let ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        other => {
            problems.push(format!("{at}: schema type {other} (every node needs a type)"));
            return;
        }
    };
    if !ok {
        problems.push(format!("{at}: expected {ty}, got {value}"));
        return;
    }
    if let Some(choices) = schema["enum"].as_array()
        && !choices.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {choices:?}"));
    }
    match value {
        Value::Object(map) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                if !map.contains_key(required.as_str().unwrap()) {
                    problems.push(format!("{at}: missing {required}"));
                }
            }
            for (key, field) in map {
                let child = format!("{at}.{key}");
                if let Some(sub) = schema["properties"].get(key) {
                    check(sub, field, &child, problems);
                } else if let Some(sub) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                    check(sub, field, &child, problems);
                } else if schema["properties"].is_object() {
                    problems.push(format!("{child}: unknown field (the API server would prune it)"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                problems.push(format!("{at}: fewer than {min} items"));
            }
            for (i, item) in items.iter().enumerate() {
                check(&schema["items"], item, &format!("{at}[{i}]"), problems);
            }
        }
        Value::String(s) => {
            if let Some(max) = schema["maxLength"].as_u64()
                && s.chars().count() as u64 > max
            {
                problems.push(format!("{at}: longer than {max}"));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && !regex::Regex::new(pattern).unwrap().is_match(s)
            {
                problems.push(format!("{at}: {s:?} does not match {pattern}"));
            }
        }
        Value::Number(n) => {
            let n = n.as_i64().unwrap();
            if schema["minimum"].as_i64().is_some_and(|m| n < m)
                || schema["maximum"].as_i64().is_some_and(|m| n > m)
            {
                problems.push(format!("{at}: {n} out of bounds"));
            }
        }
        _ => {}
    }
}

fn schema_problems(object: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    check(
        &schema(object["kind"].as_str().unwrap()),
        object,
        "",
        &mut problems,
    );
    problems
}

/// Every domain policy object in deploy/examples and in the README's YAML blocks.
fn example_objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy/examples")).unwrap() {
        let path = entry.unwrap().path();
        for doc in documents(&std::fs::read_to_string(&path).unwrap()) {
            if doc["apiVersion"] == "pipeguard.dev/v1alpha1" {
                out.push((path.display().to_string(), doc));
            }
        }
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for block in readme.split("```yaml").skip(1) {
        let block = block.split("```").next().unwrap();
        for doc in documents(block) {
            if doc["apiVersion"] == "pipeguard.dev/v1alpha1" {
                out.push(("README.md".into(), doc));
            }
        }
    }
    out
}

#[test]
fn both_crds_serve_v1alpha1_with_the_right_scope_and_names() {
    let all = crds();
    assert_eq!(all.len(), 2);
    for (kind, plural, scope) in [
        ("DomainPolicy", "domainpolicies", "Namespaced"),
        ("ClusterDomainPolicy", "clusterdomainpolicies", "Cluster"),
    ] {
        let c = crd(kind);
        assert_eq!(c["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(c["metadata"]["name"], format!("{plural}.pipeguard.dev"));
        assert_eq!(c["spec"]["group"], "pipeguard.dev");
        assert_eq!(c["spec"]["scope"], scope);
        assert_eq!(c["spec"]["names"]["plural"], plural);
        let v = &c["spec"]["versions"][0];
        assert_eq!(
            (v["served"].as_bool(), v["storage"].as_bool()),
            (Some(true), Some(true))
        );
        // The agent's watcher and the RBAC use these exact names.
        assert_eq!(pipeguard::policy::DOMAIN_API_VERSION, "pipeguard.dev/v1alpha1");
    }
    let cluster = schema("ClusterDomainPolicy");
    assert_eq!(
        cluster["properties"]["spec"]["required"],
        serde_json::json!(["namespaceSelector", "podSelector"])
    );
}

#[test]
fn examples_pass_the_schema_and_the_parser_and_select_the_runners() {
    let objects = example_objects();
    let files: std::collections::BTreeSet<&str> = objects.iter().map(|(f, _)| f.as_str()).collect();
    assert!(files.len() >= 3, "both examples and the README: {files:?}");
    for (file, object) in &objects {
        let problems = schema_problems(object);
        assert!(problems.is_empty(), "{file}: {problems:#?}");
        let set = parse_policies(file, &serde_yaml::to_string(object).unwrap());
        assert!(set.errors.is_empty(), "{file}: {:?}", set.errors);
        assert!(
            set.warnings().next().is_none(),
            "{file}: {:?}",
            set.warnings().collect::<Vec<_>>()
        );
    }
    let pod = |ns: &str, labels: &[(&str, &str)]| PodIdentity {
        namespace: ns.into(),
        name: "p".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    for (file, runner, others) in [
        (
            "arc-runner-domains.yaml",
            pod(
                "arc-runners",
                &[
                    ("app.kubernetes.io/component", "runner"),
                    ("actions.github.com/scale-set-name", "x"),
                ],
            ),
            vec![pod(
                "arc-runners",
                &[
                    ("app.kubernetes.io/component", "runner-scale-set-listener"),
                    ("actions.github.com/scale-set-name", "x"),
                ],
            )],
        ),
        (
            "gitlab-runner-domains.yaml",
            pod("gitlab-runner", &[("project.runner.gitlab.com/id", "42")]),
            vec![pod("gitlab-runner", &[("app", "gitlab-runner")])],
        ),
    ] {
        let set = pipeguard::policy::load_policies(&[repo().join("deploy/examples").join(file)]);
        let domains = domains_for(&set, &runner, None).unwrap_or_else(|| panic!("{file}: selects no runner"));
        assert!(domains.names.len() >= 5, "{file}: {:?}", domains.names);
        for other in others {
            assert_eq!(domains_for(&set, &other, None), None, "{file}: selects {other:?}");
        }
    }
}

#[test]
fn the_schema_name_pattern_never_admits_what_the_parser_refuses() {
    let domains = &schema("DomainPolicy")["properties"]["spec"]["properties"]["egress"]["items"]["properties"]
        ["domains"]["items"];
    let pattern = regex::Regex::new(domains["pattern"].as_str().unwrap()).unwrap();
    let max = domains["maxLength"].as_u64().unwrap() as usize;
    let long_label = format!("{}.com", "a".repeat(64));
    let admitted = |s: &str| pattern.is_match(s) && s.len() <= max;
    for good in [
        "github.com",
        "GitHub.com.",
        "*.githubusercontent.com",
        "xn--bcher-kva.example",
        "_acme.x.io",
        "localhost",
    ] {
        assert!(admitted(good), "{good}");
        assert!(pipeguard::policy::DomainPattern::parse(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "*",
        "a..com",
        "*.*.com",
        "foo*.com",
        "a.*.com",
        "-a.com",
        "a-.com",
        "git hub.com",
        "https://x.com",
        "bücher.example",
        "a.com..",
        long_label.as_str(),
    ] {
        assert!(!admitted(bad), "the schema admits {bad:?}");
        assert!(pipeguard::policy::DomainPattern::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_schema_check_catches_broken_objects() {
    let (_, good) = example_objects().into_iter().next().unwrap();
    assert!(schema_problems(&good).is_empty());
    let mut typo = good.clone();
    typo["spec"]["egres"] = serde_json::json!([]);
    assert!(
        schema_problems(&typo)
            .iter()
            .any(|p| p.contains("spec.egres: unknown field"))
    );
    let mut name = good.clone();
    name["spec"]["egress"][0]["domains"][0] = "a..b".into();
    assert!(
        schema_problems(&name)
            .iter()
            .any(|p| p.contains("does not match"))
    );
    let mut port = good.clone();
    port["spec"]["egress"][0]["ports"] = serde_json::json!([{"port": "https"}]);
    assert!(
        schema_problems(&port)
            .iter()
            .any(|p| p.contains("expected integer"))
    );
    let mut proto = good.clone();
    proto["spec"]["egress"][0]["ports"] = serde_json::json!([{"port": 443, "protocol": "tcp"}]);
    assert!(
        schema_problems(&proto)
            .iter()
            .any(|p| p.contains("is not one of"))
    );
    let mut empty = good;
    empty["spec"]["egress"][0]["domains"] = serde_json::json!([]);
    assert!(schema_problems(&empty).iter().any(|p| p.contains("fewer than 1")));
}
