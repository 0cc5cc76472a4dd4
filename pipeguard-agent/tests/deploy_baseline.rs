//! deploy/crd-workloadbaseline.yaml and the RBAC agree with what the agent writes: the
//! group, version, kind and plural it uses, the run cap, and the verbs of its requests.

use std::path::{Path, PathBuf};

use pipeguard::baseline::{
    MAX_RUNS,
    object::{GROUP, KIND, PLURAL, VERSION},
};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn the_crd_and_the_rbac_match_what_the_agent_writes() {
    let crd = &documents("deploy/crd-workloadbaseline.yaml")[0];
    assert_eq!(crd["metadata"]["name"], format!("{PLURAL}.{GROUP}"));
    assert_eq!(crd["spec"]["group"], GROUP);
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], KIND);
    assert_eq!(crd["spec"]["names"]["plural"], PLURAL);
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], VERSION);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["runs"]["maxItems"], MAX_RUNS as u64);
    // Runs are kept whole: nothing of a run may be pruned by the API server.
    assert_eq!(
        spec["properties"]["runs"]["items"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    let rbac = documents("deploy/rbac.yaml");
    let role = rbac.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let rule = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"].as_array().unwrap().iter().any(|x| x == PLURAL))
        .expect("a rule for workloadbaselines");
    assert_eq!(rule["apiGroups"][0], GROUP);
    assert_eq!(rule["verbs"], serde_json::json!(["list", "create", "patch"]));
    let kustomization = std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).unwrap();
    assert!(kustomization.contains("- crd-workloadbaseline.yaml"));
}
