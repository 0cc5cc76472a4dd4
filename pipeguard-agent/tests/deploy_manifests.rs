//! deploy/ is tested like code: every document parses into its Kubernetes type with no
//! field lost, the kustomization installs exactly the manifests there are, RBAC is exactly
//! the minimum, the DaemonSet gives the agent what it needs and nothing more, its flags are
//! flags the agent parses, and the example policies compile with pipeguard's own parser
//! and isolate the runner pods they are written for.
//!
//! The checks are functions that return the problems they find; `checks_catch_broken_manifests`
//! feeds them broken copies of the manifests, so each check is shown to be able to fail.
//! What is not tested here: that a real cluster accepts and runs these manifests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use clap::CommandFactory;
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use pipeguard::policy::{Egress, PodIdentity, egress_for, load_policies};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "pipeguard-system";
const SERVICE_ACCOUNT: &str = "pipeguard";
const CONFIG_MAP: &str = "pipeguard-config";
const METRICS_PORT: i32 = 9440;
const METRICS_PORT_NAME: &str = "http-metrics";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const BPFFS: &str = "/sys/fs/bpf";
const BTF: &str = "/sys/kernel/btf";
/// The agent's --pin-dir default; the ConfigMap may override it.
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/pipeguard";
/// BPF: bpf(2). NET_ADMIN: networking program types on cgroups. PERFMON: the verifier
/// refuses the programs without it. No SYS_ADMIN: see daemonset.yaml.
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

// ---------------------------------------------------------------------------------------
// Reading deploy/

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Every YAML file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if is_yaml(&path) {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The documents of a (multi-document) YAML file as JSON values; empty documents skipped.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let yaml = serde_yaml::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            serde_json::to_value(yaml).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every Kubernetes manifest under deploy/ (all but the kustomization), with its file.
fn manifests() -> Vec<(PathBuf, Value)> {
    yaml_files(&deploy())
        .into_iter()
        .filter(|f| !f.ends_with("kustomization.yaml"))
        .flat_map(|f| documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

/// Parses into `T` and back. k8s-openapi ignores fields it does not know, so a misspelled
/// or misplaced field shows up only as a difference after the round trip.
fn typed<T: DeserializeOwned + Serialize + Resource>(doc: &Value) -> Result<T, String> {
    if doc["apiVersion"] != T::API_VERSION || doc["kind"] != T::KIND {
        return Err(format!(
            "apiVersion/kind {}/{} is not {}/{}",
            doc["apiVersion"],
            doc["kind"],
            T::API_VERSION,
            T::KIND
        ));
    }
    let obj: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
    let lost = diff(doc, &back, "");
    if !lost.is_empty() {
        return Err(format!(
            "fields lost in the round trip through {}: {}",
            T::KIND,
            lost.join(", ")
        ));
    }
    Ok(obj)
}

/// Paths present in `a` and not equal in `b`.
fn diff(a: &Value, b: &Value, at: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .flat_map(|(k, v)| diff(v, y.get(k).unwrap_or(&Value::Null), &format!("{at}.{k}")))
            .collect(),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .flat_map(|(i, (v, w))| diff(v, w, &format!("{at}[{i}]")))
            .collect(),
        _ if a == b => Vec::new(),
        // A CRD schema's bounds are floats in k8s-openapi: `minimum: 1` comes back as 1.0.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => Vec::new(),
        _ => vec![if at.is_empty() { "<root>".into() } else { at.into() }],
    }
}

/// Checks one document: a kind deploy/ is allowed to hold, no field lost.
fn document_problem(doc: &Value) -> Option<String> {
    let result = match doc["kind"].as_str().unwrap_or_default() {
        "Namespace" => typed::<Namespace>(doc).map(drop),
        "ServiceAccount" => typed::<ServiceAccount>(doc).map(drop),
        "ClusterRole" => typed::<ClusterRole>(doc).map(drop),
        "ClusterRoleBinding" => typed::<ClusterRoleBinding>(doc).map(drop),
        "ConfigMap" => typed::<ConfigMap>(doc).map(drop),
        "DaemonSet" => typed::<DaemonSet>(doc).map(drop),
        "NetworkPolicy" => typed::<NetworkPolicy>(doc).map(drop),
        "Service" => typed::<Service>(doc).map(drop),
        "CustomResourceDefinition" => typed::<CustomResourceDefinition>(doc).map(drop),
        // Read by pipeguard's own parser, which is strict: no lost field either.
        "DomainPolicy" | "ClusterDomainPolicy" => {
            let set = pipeguard::policy::parse_policies("deploy", &serde_yaml::to_string(doc).unwrap());
            match set.errors.first() {
                Some(e) => Err(e.to_string()),
                None => Ok(()),
            }
        }
        other => Err(format!("unexpected kind {other:?}")),
    };
    result.err()
}

/// The one object of kind `T` in the installed manifests (not the examples).
fn the<T: DeserializeOwned + Serialize + Resource>() -> T {
    let mut found: Vec<T> = manifests()
        .iter()
        .filter(|(f, d)| !f.starts_with(deploy().join("examples")) && d["kind"] == T::KIND)
        .map(|(f, d)| typed(d).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {} in deploy/", T::KIND);
    found.remove(0)
}

// ---------------------------------------------------------------------------------------
// Checks, each returning the problems it finds

fn kustomization_problems(kustomization: &Value, present: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let keys: BTreeSet<&str> = kustomization
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for key in keys.difference(&BTreeSet::from([
        "apiVersion",
        "kind",
        "resources",
        "images",
        "patches",
    ])) {
        problems.push(format!(
            "unexpected kustomization key {key} (only resources, images and the monitoring-namespace patch: no bases or generators)"
        ));
    }
    // The one patch: the monitoring namespace of the agent's NetworkPolicy, in one place.
    if let Some(patches) = kustomization.get("patches") {
        match monitoring_namespace(kustomization) {
            Some(ns) if !ns.is_empty() && patches.as_array().is_some_and(|p| p.len() == 1) => {}
            _ => problems.push(format!(
                "patches must be exactly the monitoring-namespace patch of NetworkPolicy {AGENT_POLICY}: {patches}"
            )),
        }
    }
    let listed: Vec<String> = kustomization["resources"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r.as_str().unwrap_or("<not a string>").to_string())
                .collect()
        })
        .unwrap_or_default();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    if unique.len() != listed.len() {
        problems.push(format!("resources listed twice: {listed:?}"));
    }
    for r in unique.difference(present) {
        problems.push(format!(
            "lists {r}, which is not a manifest file in deploy/ (remote bases and examples are not installed)"
        ));
    }
    for r in present.difference(&unique) {
        problems.push(format!("does not list {r}"));
    }
    problems
}

/// The agent's NetworkPolicy (who may reach port 9440).
const AGENT_POLICY: &str = "pipeguard-agent-http";
/// Where the monitoring namespace's name goes in that policy (JSON pointer).
const MONITORING_PATH: &str =
    "/spec/ingress/0/from/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name";

/// The monitoring namespace the kustomization's patch names, if it has exactly that patch.
fn monitoring_namespace(kustomization: &Value) -> Option<String> {
    let patches = kustomization["patches"].as_array()?;
    let [patch] = patches.as_slice() else { return None };
    if patch["target"]["kind"] != "NetworkPolicy" || patch["target"]["name"] != AGENT_POLICY {
        return None;
    }
    let ops: Value = serde_yaml::from_str(patch["patch"].as_str()?).ok()?;
    let [op] = ops.as_array()?.as_slice() else {
        return None;
    };
    (op["op"] == "replace" && op["path"] == MONITORING_PATH)
        .then(|| op["value"].as_str().map(str::to_string))
        .flatten()
}

/// The ClusterRole's rules flattened to (apiGroup, resource, verb); wildcards and
/// non-resource rules are errors.
fn granted(role: &ClusterRole) -> Result<BTreeSet<(String, String, String)>, String> {
    if role.aggregation_rule.is_some() {
        return Err("aggregated role".into());
    }
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        if rule.non_resource_urls.is_some() || rule.resource_names.is_some() {
            return Err(format!("non-resource URLs or resource names in {rule:?}"));
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    if [group, resource, verb].iter().any(|s| s.contains('*')) {
                        return Err(format!("wildcard in {rule:?}"));
                    }
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    Ok(granted)
}

fn minimal_rbac() -> BTreeSet<(String, String, String)> {
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        // Lists and watches only: the agent never gets a single object.
        for verb in ["list", "watch"] {
            expected.insert((group.into(), resource.into(), verb.into()));
        }
    }
    // The domain policy CRDs: list and watch are all a reflector needs.
    for resource in ["domainpolicies", "clusterdomainpolicies"] {
        for verb in ["list", "watch"] {
            expected.insert(("pipeguard.dev".into(), resource.into(), verb.into()));
        }
    }
    // Core Events, created and never patched.
    expected.insert(("".into(), "events".into(), "create".into()));
    // Workload baselines (--baseline): listed, created and merge-patched, never got,
    // replaced or deleted.
    for verb in ["list", "create", "patch"] {
        expected.insert(("pipeguard.dev".into(), "workloadbaselines".into(), verb.into()));
    }
    expected
}

fn rbac_problems(role: &ClusterRole, binding: &ClusterRoleBinding) -> Vec<String> {
    let mut problems = Vec::new();
    match granted(role) {
        Err(e) => problems.push(e),
        Ok(granted) => {
            let expected = minimal_rbac();
            for extra in granted.difference(&expected) {
                problems.push(format!("grants more than the minimum: {extra:?}"));
            }
            for missing in expected.difference(&granted) {
                problems.push(format!("does not grant {missing:?}"));
            }
        }
    }
    let role_ref = &binding.role_ref;
    if (role_ref.api_group.as_deref(), role_ref.kind.as_str())
        != (Some("rbac.authorization.k8s.io"), "ClusterRole")
        || Some(&role_ref.name) != role.metadata.name.as_ref()
    {
        problems.push(format!("binding refers to {role_ref:?}, not the ClusterRole"));
    }
    let subjects: Vec<_> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
        .collect();
    if subjects != [("ServiceAccount", SERVICE_ACCOUNT, Some(NAMESPACE))] {
        problems.push(format!(
            "binding subjects {subjects:?} are not just the agent's ServiceAccount"
        ));
    }
    problems
}

/// The agent's environment as the DaemonSet gives it: the ConfigMap (envFrom) overlaid with
/// the container's env; downward-API values become a stand-in.
fn agent_env(container: &Container, config: &ConfigMap) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        if from.config_map_ref.as_ref().map(|r| r.name.as_str()) == Some(CONFIG_MAP) {
            env.extend(config.data.clone().unwrap_or_default());
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(_)) => "from-the-downward-api".into(),
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    env
}

/// Turns the PIPEGUARD_* environment into the equivalent command line, through the agent's
/// own clap definition, and parses it: a variable the agent does not read, or a value it
/// rejects, is a problem.
fn cli_problems(args: &[String], env: &BTreeMap<String, String>) -> Vec<String> {
    let cli = pipeguard::cli::Cli::command();
    let agent = cli
        .find_subcommand("agent")
        .expect("pipeguard has an agent subcommand")
        .clone();
    let mut problems = Vec::new();
    let mut argv: Vec<String> = vec!["pipeguard".into()];
    argv.extend(args.iter().cloned());
    for (name, value) in env.iter().filter(|(n, _)| n.starts_with("PIPEGUARD_")) {
        let arg = agent
            .get_arguments()
            .chain(cli.get_arguments())
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()));
        let Some(arg) = arg else {
            problems.push(format!(
                "{name} is not an environment variable `pipeguard agent` reads"
            ));
            continue;
        };
        let long = format!("--{}", arg.get_long().expect("env flags have a long name"));
        if arg.get_action().takes_values() {
            argv.push(format!("{long}={value}"));
        } else {
            match value.as_str() {
                "true" => argv.push(long),
                "false" => {}
                other => problems.push(format!("{name}={other:?}: a switch takes \"true\" or \"false\"")),
            }
        }
    }
    if let Err(e) = try_parse(&argv) {
        problems.push(format!("`{}` does not parse: {e}", argv.join(" ")));
    }
    problems
}

/// Parses `argv` against the agent's definition only: the derived command would also read
/// this test process's environment, which is not the pod's.
fn try_parse(argv: &[String]) -> Result<(), clap::Error> {
    let no_env = |c: clap::Command| {
        let ids: Vec<_> = c.get_arguments().map(|a| a.get_id().clone()).collect();
        ids.into_iter()
            .fold(c, |c, id| c.mut_arg(id, |a| a.env(None::<&str>)))
    };
    no_env(pipeguard::cli::Cli::command())
        .mut_subcommand("agent", no_env)
        .try_get_matches_from(argv)
        .map(drop)
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec
        .template
        .spec
        .clone()
        .expect("the DaemonSet has a pod template spec")
}

fn daemonset_problems(ds: &DaemonSet, config: &ConfigMap) -> Vec<String> {
    let problems = std::cell::RefCell::new(Vec::new());
    let check = |ok: bool, problem: &str| {
        if !ok {
            problems.borrow_mut().push(problem.to_string());
        }
    };
    let pod = pod_spec(ds);
    let template_labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = ds.spec.selector.match_labels.clone().unwrap_or_default();
    check(
        !selector.is_empty() && selector.iter().all(|(k, v)| template_labels.get(k) == Some(v)),
        "the selector does not select the pod template",
    );
    check(
        pod.service_account_name.as_deref() == Some(SERVICE_ACCOUNT),
        "does not run as the pipeguard ServiceAccount",
    );
    check(
        pod.host_network != Some(true),
        "hostNetwork: the agent does not need the host network",
    );
    check(
        pod.host_pid != Some(true),
        "hostPID: the agent does not need host processes",
    );
    check(
        pod.host_ipc != Some(true),
        "hostIPC: the agent does not need host IPC",
    );
    check(
        pod.priority_class_name.as_deref() == Some("system-node-critical"),
        "priorityClassName is not system-node-critical",
    );
    check(
        pod.termination_grace_period_seconds.is_some(),
        "terminationGracePeriodSeconds is not set",
    );
    let strategy = ds.spec.update_strategy.clone().unwrap_or_default();
    check(
        strategy.type_.as_deref() == Some("RollingUpdate")
            && strategy.rolling_update.and_then(|r| r.max_unavailable) == Some(IntOrString::Int(1)),
        "updateStrategy is not RollingUpdate with maxUnavailable 1",
    );
    for effect in ["NoSchedule", "NoExecute"] {
        check(
            pod.tolerations.iter().flatten().any(|t| {
                t.key.is_none()
                    && t.operator.as_deref() == Some("Exists")
                    && t.effect.as_deref() == Some(effect)
            }),
            &format!("does not tolerate every {effect} taint (runner node pools are tainted)"),
        );
    }

    check(
        pod.containers.len() == 1 && pod.init_containers.is_none(),
        "one container, no init containers",
    );
    let c = &pod.containers[0];
    check(c.image.as_deref().is_some_and(|i| !i.is_empty()), "no image");
    check(
        c.command.is_none() && c.args.as_deref() == Some(&["agent".to_string()][..]),
        "args are not [agent]",
    );

    let sc = c.security_context.clone().unwrap_or_default();
    check(sc.privileged != Some(true), "privileged");
    check(
        sc.allow_privilege_escalation == Some(false),
        "allowPrivilegeEscalation is not false",
    );
    check(
        sc.read_only_root_filesystem == Some(true),
        "readOnlyRootFilesystem is not true",
    );
    check(
        sc.run_as_user == Some(0),
        "runAsUser is not 0 (added capabilities reach only uid 0)",
    );
    let caps = sc.capabilities.unwrap_or_default();
    check(
        caps.drop.as_deref() == Some(&["ALL".to_string()][..]),
        "capabilities do not drop ALL",
    );
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let wanted: BTreeSet<String> = CAPABILITIES.iter().map(|s| s.to_string()).collect();
    check(
        added == wanted,
        &format!("capabilities add {added:?}, not {wanted:?}"),
    );

    // Volumes: only these host paths, each mounted at the same path, as the agent expects.
    let volumes: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| {
            (
                v.name.clone(),
                v.host_path.as_ref().map(|h| h.path.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let mounts: BTreeMap<String, _> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.clone(), m.clone()))
        .collect();
    // The cgroup tree read-only (the agent only reads it and opens directories to attach);
    // of bpffs only the pin directory, writable.
    let expected_mounts = [
        (CGROUP_ROOT, Some("HostToContainer"), true),
        (DEFAULT_PIN_DIR, Some("HostToContainer"), false),
        (BTF, None, true),
    ];
    for (path, propagation, read_only) in expected_mounts {
        let Some(m) = mounts.get(path) else {
            problems.borrow_mut().push(format!("{path} is not mounted"));
            continue;
        };
        if volumes.get(&m.name).map(String::as_str) != Some(path) {
            problems
                .borrow_mut()
                .push(format!("{path} is not the host's {path} (hostPath)"));
        }
        if m.mount_propagation.as_deref().unwrap_or("None") != propagation.unwrap_or("None") {
            problems.borrow_mut().push(format!(
                "{path}: mountPropagation {:?}, not {propagation:?}",
                m.mount_propagation
            ));
        }
        if m.read_only.unwrap_or(false) != read_only {
            problems
                .borrow_mut()
                .push(format!("{path}: readOnly {:?}", m.read_only));
        }
    }
    let expected_paths: BTreeSet<&str> = expected_mounts.iter().map(|m| m.0).collect();
    for (name, host) in &volumes {
        if !expected_paths.contains(host.as_str()) {
            problems.borrow_mut().push(format!(
                "volume {name} ({host:?}) is not one of the agent's host paths"
            ));
        }
    }
    for path in mounts.keys() {
        if !expected_paths.contains(path.as_str()) {
            problems.borrow_mut().push(format!("unexpected mount {path}"));
        }
    }

    // Environment: node name from the downward API, the ConfigMap, paths that match the mounts.
    let node = c.env.iter().flatten().find(|e| e.name == "PIPEGUARD_NODE_NAME");
    check(
        node.and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .is_some_and(|f| f.field_path == "spec.nodeName"),
        "PIPEGUARD_NODE_NAME is not spec.nodeName from the downward API",
    );
    check(
        c.env_from.iter().flatten().any(|f| {
            f.prefix.is_none()
                && f.config_map_ref
                    .as_ref()
                    .is_some_and(|r| r.name == CONFIG_MAP && r.optional != Some(true))
        }),
        "envFrom does not load the pipeguard-config ConfigMap",
    );
    let env = agent_env(c, config);
    check(
        env.get("PIPEGUARD_CGROUP_ROOT").map(String::as_str) == Some(CGROUP_ROOT),
        "PIPEGUARD_CGROUP_ROOT is not the mounted cgroup2 root",
    );
    let pin_dir = env
        .get("PIPEGUARD_PIN_DIR")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PIN_DIR);
    check(
        Path::new(pin_dir).starts_with(BPFFS) && Path::new(pin_dir) != Path::new(BPFFS),
        &format!("pin dir {pin_dir} is not a directory on the host's bpffs"),
    );
    problems
        .borrow_mut()
        .extend(cli_problems(c.args.as_deref().unwrap_or_default(), &env));

    // The HTTP listener, its port, the probes and the scrape annotation agree.
    let listen = env
        .get("PIPEGUARD_LISTEN")
        .map(String::as_str)
        .unwrap_or("0.0.0.0:9440");
    check(
        listen
            .rsplit_once(':')
            .is_some_and(|(_, p)| p == METRICS_PORT.to_string()),
        &format!("PIPEGUARD_LISTEN {listen} is not on port {METRICS_PORT}"),
    );
    check(
        c.ports.iter().flatten().any(|p| {
            p.container_port == METRICS_PORT
                && p.name.as_deref() == Some(METRICS_PORT_NAME)
                && p.host_port.is_none()
        }),
        "no container port 9440 named http-metrics (and no hostPort)",
    );
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| (g.path.clone().unwrap_or_default(), g.port.clone()))
    };
    for (what, got, path) in [
        ("liveness", probe(&c.liveness_probe), "/healthz"),
        ("readiness", probe(&c.readiness_probe), "/readyz"),
    ] {
        let on_metrics_port = |port: &IntOrString| match port {
            IntOrString::Int(n) => *n == METRICS_PORT,
            IntOrString::String(s) => s == METRICS_PORT_NAME,
        };
        check(
            got.as_ref()
                .is_some_and(|(p, port)| p == path && on_metrics_port(port)),
            &format!("{what} probe is not GET {path} on the metrics port: {got:?}"),
        );
    }
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    check(
        annotations.get("prometheus.io/scrape").map(String::as_str) == Some("true")
            && annotations.get("prometheus.io/port") == Some(&METRICS_PORT.to_string())
            && annotations.get("prometheus.io/path").map(String::as_str) == Some("/metrics"),
        "no Prometheus scrape annotations for :9440/metrics",
    );

    // Resources, as documented in daemonset.yaml.
    let resources = c.resources.clone().unwrap_or_default();
    let quantities =
        |m: Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            m.unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect::<BTreeMap<_, _>>()
        };
    let pair = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_string(), cpu.to_string()),
            ("memory".to_string(), memory.to_string()),
        ])
    };
    check(
        quantities(resources.requests) == pair("50m", "64Mi"),
        "requests are not cpu 50m, memory 64Mi",
    );
    check(
        quantities(resources.limits) == pair("500m", "768Mi"),
        "limits are not cpu 500m, memory 768Mi",
    );
    problems.into_inner()
}

/// The RFC 5737 documentation ranges: example policies must not name real third parties.
fn in_documentation_ranges(cidr: &str) -> bool {
    let Some((addr, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(IpAddr::V4(addr)), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    len >= 24
        && ["192.0.2.0", "198.51.100.0", "203.0.113.0"].iter().any(|net| {
            (u32::from(addr) & 0xffff_ff00) == u32::from(net.parse::<std::net::Ipv4Addr>().unwrap())
        })
}

fn example_address_problems(policy: &NetworkPolicy) -> Vec<String> {
    let mut problems = Vec::new();
    let spec = policy.spec.clone().unwrap_or_default();
    let peers = spec
        .egress
        .iter()
        .flatten()
        .flat_map(|r| r.to.clone().unwrap_or_default())
        .chain(
            spec.ingress
                .iter()
                .flatten()
                .flat_map(|r| r.from.clone().unwrap_or_default()),
        );
    for peer in peers {
        if let Some(block) = peer.ip_block {
            for cidr in std::iter::once(block.cidr).chain(block.except.unwrap_or_default()) {
                if !in_documentation_ranges(&cidr) {
                    problems.push(format!("{cidr} is not in a documentation range (RFC 5737)"));
                }
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn every_document_is_a_known_kind_with_no_lost_fields() {
    let all = manifests();
    assert!(all.len() >= 12, "{} documents under deploy/", all.len());
    let mut problems = Vec::new();
    for (file, doc) in &all {
        if let Some(p) = document_problem(doc) {
            problems.push(format!("{}: {p}", file.display()));
        }
        // Installed objects live in pipeguard-system (cluster-scoped ones have no namespace).
        if !file.starts_with(deploy().join("examples")) {
            let namespace = doc["metadata"]["namespace"].as_str();
            let cluster_scoped = [
                "Namespace",
                "ClusterRole",
                "ClusterRoleBinding",
                "CustomResourceDefinition",
            ]
            .contains(&doc["kind"].as_str().unwrap_or_default());
            if cluster_scoped == namespace.is_some() || namespace.is_some_and(|n| n != NAMESPACE) {
                problems.push(format!(
                    "{}: {} has namespace {namespace:?}",
                    file.display(),
                    doc["kind"]
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let ns: Namespace = the();
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    let sa: ServiceAccount = the();
    assert_eq!(sa.metadata.name.as_deref(), Some(SERVICE_ACCOUNT));
}

#[test]
fn kustomization_lists_exactly_the_resource_files() {
    let k = &documents(&deploy().join("kustomization.yaml"))[0];
    let present: BTreeSet<String> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && is_yaml(p) && !p.ends_with("kustomization.yaml"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(present.len() >= 4, "{present:?}");
    let problems = kustomization_problems(k, &present);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn only_the_monitoring_namespace_reaches_the_agents_port() {
    let k = &documents(&deploy().join("kustomization.yaml"))[0];
    let monitoring = monitoring_namespace(k).expect("the kustomization names the monitoring namespace");
    assert_eq!(monitoring, "monitoring");
    let policy: NetworkPolicy = the();
    assert_eq!(policy.metadata.name.as_deref(), Some(AGENT_POLICY));
    let spec = policy.spec.clone().unwrap_or_default();
    let ds: DaemonSet = the();
    let pod_labels = ds.spec.template.metadata.unwrap().labels.unwrap();
    let selector = spec
        .pod_selector
        .clone()
        .unwrap_or_default()
        .match_labels
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the policy does not select the agent pods: {selector:?}"
    );
    assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
    let ingress = spec.ingress.clone().unwrap_or_default();
    assert_eq!(ingress.len(), 1, "one rule");
    let from = ingress[0].from.clone().unwrap_or_default();
    assert_eq!(from.len(), 1, "one peer");
    assert!(from[0].pod_selector.is_none() && from[0].ip_block.is_none());
    let ns_labels = from[0]
        .namespace_selector
        .clone()
        .and_then(|s| s.match_labels)
        .unwrap_or_default();
    assert_eq!(ns_labels.len(), 1);
    assert!(
        ns_labels.contains_key("kubernetes.io/metadata.name"),
        "{ns_labels:?}"
    );
    let ports = ingress[0].ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(
        ports[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
            METRICS_PORT
        ))
    );
    // Rendered by kubectl, the patch lands: the policy names the monitoring namespace.
    let docs = kustomize(&deploy());
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == AGENT_POLICY)
        .expect("the policy is rendered");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        monitoring.as_str()
    );
}

#[test]
fn rbac_is_minimal_and_bound_to_the_agent() {
    let role: ClusterRole = the();
    let binding: ClusterRoleBinding = the();
    let problems = rbac_problems(&role, &binding);
    assert!(problems.is_empty(), "{problems:#?}");
    let ds: DaemonSet = the();
    assert_eq!(
        pod_spec(&ds).service_account_name.as_deref(),
        Some(SERVICE_ACCOUNT)
    );
}

#[test]
fn the_daemonset_has_what_the_agent_needs_and_no_more() {
    let ds: DaemonSet = the();
    let config: ConfigMap = the();
    assert_eq!(config.metadata.name.as_deref(), Some(CONFIG_MAP));
    let problems = daemonset_problems(&ds, &config);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_configmap_holds_only_flags_the_agent_parses() {
    let config: ConfigMap = the();
    let data = config.data.clone().unwrap_or_default();
    assert!(!data.is_empty());
    for key in data.keys() {
        assert!(key.starts_with("PIPEGUARD_"), "{key}: not a pipeguard flag");
    }
    // The node name comes from the downward API, never from a shared ConfigMap.
    assert!(!data.contains_key("PIPEGUARD_NODE_NAME"));
    let env: BTreeMap<String, String> = data
        .into_iter()
        .chain([("PIPEGUARD_NODE_NAME".to_string(), "node-1".to_string())])
        .collect();
    let problems = cli_problems(&["agent".into()], &env);
    assert!(problems.is_empty(), "{problems:#?}");
}

struct Example {
    file: &'static str,
    namespace: &'static str,
    runner_labels: &'static [(&'static str, &'static str)],
    /// Pods in the same namespace that the policies must leave alone.
    others: &'static [&'static [(&'static str, &'static str)]],
}

const EXAMPLES: [Example; 2] = [
    Example {
        file: "arc-runner-egress.yaml",
        namespace: "arc-runners",
        runner_labels: &[
            ("actions.github.com/scale-set-name", "linux-x64"),
            ("app.kubernetes.io/component", "runner"),
            ("actions-ephemeral-runner", "True"),
        ],
        others: &[
            &[],
            // An ARC listener carries the scale set's name too.
            &[
                ("actions.github.com/scale-set-name", "linux-x64"),
                ("app.kubernetes.io/component", "runner-scale-set-listener"),
            ],
        ],
    },
    Example {
        file: "gitlab-runner-egress.yaml",
        namespace: "gitlab-runner",
        runner_labels: &[
            ("project.runner.gitlab.com/id", "42"),
            ("project.runner.gitlab.com/name", "app"),
            ("job.runner.gitlab.com/pod", "runner-abc-project-42-concurrent-0"),
            ("manager.runner.gitlab.com/name", "gitlab-runner-0"),
        ],
        // The runner manager itself.
        others: &[&[], &[("app", "gitlab-runner")]],
    },
];

fn pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> PodIdentity {
    PodIdentity {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn example_policies_compile_and_isolate_the_runner_pods() {
    let examples = deploy().join("examples");
    // Domain policy examples (`*-domains.yaml`) are tested in deploy_domains.rs.
    let files: BTreeSet<PathBuf> = yaml_files(&examples)
        .into_iter()
        .filter(|f| !f.to_string_lossy().ends_with("-domains.yaml"))
        .collect();
    let tested: BTreeSet<PathBuf> = EXAMPLES.iter().map(|e| examples.join(e.file)).collect();
    assert_eq!(files, tested, "every example is tested here");

    for e in &EXAMPLES {
        let path = examples.join(e.file);
        let set = load_policies(std::slice::from_ref(&path));
        assert!(set.errors.is_empty(), "{}: {:?}", e.file, set.errors);
        assert_eq!(
            set.policies.len(),
            3,
            "{}: default deny, DNS, destinations",
            e.file
        );

        let docs = documents(&path);
        let mut deny = Vec::new();
        for doc in &docs {
            let policy: NetworkPolicy = typed(doc).unwrap_or_else(|err| panic!("{}: {err}", e.file));
            assert_eq!(
                policy.metadata.namespace.as_deref(),
                Some(e.namespace),
                "{}",
                e.file
            );
            let problems = example_address_problems(&policy);
            assert!(problems.is_empty(), "{}: {problems:?}", e.file);
            let spec = policy.spec.clone().unwrap();
            if spec.egress.as_ref().is_some_and(Vec::is_empty) {
                deny.push(format!("{}/{}", e.namespace, policy.metadata.name.unwrap()));
            }
        }
        assert_eq!(deny.len(), 1, "{}: one default-deny policy: {deny:?}", e.file);

        let Egress::Isolated { policies, rules, .. } =
            egress_for(&set, &pod(e.namespace, "runner-1", e.runner_labels), None)
        else {
            panic!("{}: the runner pod must be isolated", e.file)
        };
        assert_eq!(
            policies.len(),
            3,
            "{}: every policy selects the runner pod: {policies:?}",
            e.file
        );
        assert!(
            policies.contains(&deny[0]),
            "{}: {} selects the runner pod",
            e.file,
            deny[0]
        );
        assert!(!rules.is_empty(), "{}: the allowlist is not empty", e.file);

        // Without the allow policies, the default deny alone isolates the runner pod.
        let mut alone = load_policies(std::slice::from_ref(&path));
        alone
            .policies
            .retain(|p| deny.contains(&format!("{}/{}", p.namespace, p.name)));
        assert_eq!(alone.policies.len(), 1, "{}", e.file);
        match egress_for(&alone, &pod(e.namespace, "runner-1", e.runner_labels), None) {
            Egress::Isolated { rules, .. } => {
                assert!(rules.is_empty(), "{}: default deny allows nothing", e.file)
            }
            Egress::Unrestricted => panic!("{}: the default deny does not select the runner pod", e.file),
        }

        for labels in e.others {
            assert_eq!(
                egress_for(&set, &pod(e.namespace, "other", labels), None),
                Egress::Unrestricted,
                "{}: a pod labelled {labels:?} is left alone",
                e.file
            );
        }
        assert_eq!(
            egress_for(&set, &pod("elsewhere", "runner-2", e.runner_labels), None),
            Egress::Unrestricted,
            "{}: runner pods in other namespaces are not selected by these policies",
            e.file
        );
    }
}

/// Every check above, given broken copies of the real manifests, reports the breakage.
#[test]
fn checks_catch_broken_manifests() {
    // A misspelled field is caught by the round trip; a wrong kind is refused.
    let ds_file = deploy().join("daemonset.yaml");
    let ds_doc = documents(&ds_file).remove(0);
    assert_eq!(document_problem(&ds_doc), None);
    let mut typo = ds_doc.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["securityContex"] =
        serde_json::json!({"privileged": true});
    assert!(
        document_problem(&typo).is_some_and(|p| p.contains("securityContex")),
        "{:?}",
        document_problem(&typo)
    );
    let mut nested = ds_doc.clone();
    nested["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropogation"] =
        "Bidirectional".into();
    assert!(document_problem(&nested).is_some());
    let mut kind = ds_doc.clone();
    kind["kind"] = "Deployment".into();
    assert!(document_problem(&kind).is_some());
    let mut version = ds_doc.clone();
    version["apiVersion"] = "extensions/v1beta1".into();
    assert!(document_problem(&version).is_some());

    // Kustomization.
    let k = &documents(&deploy().join("kustomization.yaml"))[0];
    let present: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert!(kustomization_problems(k, &present).is_empty());
    let mut more = present.clone();
    more.insert("service.yaml".into());
    assert!(!kustomization_problems(k, &more).is_empty(), "an unlisted file");
    let mut remote = k.clone();
    remote["resources"]
        .as_array_mut()
        .unwrap()
        .push("github.com/example/base?ref=v1".into());
    assert!(
        !kustomization_problems(&remote, &present).is_empty(),
        "a remote base"
    );
    let mut generator = k.clone();
    generator["configMapGenerator"] = serde_json::json!([]);
    assert!(
        !kustomization_problems(&generator, &present).is_empty(),
        "an extra key"
    );
    let mut other_patch = k.clone();
    other_patch["patches"][0]["target"]["name"] = "pipeguard-agent".into();
    assert!(
        !kustomization_problems(&other_patch, &present).is_empty(),
        "a patch of something else"
    );

    // RBAC.
    let role: ClusterRole = the();
    let binding: ClusterRoleBinding = the();
    let mut wider = role.clone();
    wider.rules.as_mut().unwrap()[0].verbs.push("delete".into());
    assert!(
        rbac_problems(&wider, &binding)
            .iter()
            .any(|p| p.contains("delete"))
    );
    let mut wildcard = role.clone();
    wildcard.rules.as_mut().unwrap()[0].resources = Some(vec!["*".into()]);
    assert!(
        rbac_problems(&wildcard, &binding)
            .iter()
            .any(|p| p.contains("wildcard"))
    );
    let mut narrower = role.clone();
    narrower.rules.as_mut().unwrap().pop();
    assert!(
        rbac_problems(&narrower, &binding)
            .iter()
            .any(|p| p.contains("does not grant"))
    );
    let mut other_sa = binding.clone();
    other_sa.subjects.as_mut().unwrap()[0].namespace = Some("default".into());
    assert!(!rbac_problems(&role, &other_sa).is_empty());

    // DaemonSet.
    let ds: DaemonSet = the();
    let config: ConfigMap = the();
    assert!(daemonset_problems(&ds, &config).is_empty());
    let broken = |change: &dyn Fn(&mut DaemonSet, &mut ConfigMap), expect: &str| {
        let (mut d, mut c) = (ds.clone(), config.clone());
        change(&mut d, &mut c);
        let problems = daemonset_problems(&d, &c);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "expected {expect:?} in {problems:#?}"
        );
    };
    fn container(d: &mut DaemonSet) -> &mut Container {
        &mut d.spec.template.spec.as_mut().unwrap().containers[0]
    }
    fn security(d: &mut DaemonSet) -> &mut k8s_openapi::api::core::v1::SecurityContext {
        container(d).security_context.as_mut().unwrap()
    }
    broken(&|d, _| security(d).privileged = Some(true), "privileged");
    broken(
        &|d, _| {
            security(d)
                .capabilities
                .as_mut()
                .unwrap()
                .add
                .as_mut()
                .unwrap()
                .push("NET_RAW".into())
        },
        "capabilities add",
    );
    broken(
        &|d, _| {
            security(d)
                .capabilities
                .as_mut()
                .unwrap()
                .add
                .as_mut()
                .unwrap()
                .retain(|c| c != "BPF")
        },
        "capabilities add",
    );
    broken(
        &|d, _| security(d).capabilities.as_mut().unwrap().drop = Some(vec!["NET_RAW".into()]),
        "drop ALL",
    );
    broken(
        &|d, _| security(d).read_only_root_filesystem = None,
        "readOnlyRootFilesystem",
    );
    broken(&|d, _| security(d).run_as_user = Some(1000), "runAsUser");
    broken(
        &|d, _| security(d).allow_privilege_escalation = Some(true),
        "allowPrivilegeEscalation",
    );
    broken(
        &|d, _| d.spec.template.spec.as_mut().unwrap().host_network = Some(true),
        "hostNetwork",
    );
    broken(
        &|d, _| d.spec.template.spec.as_mut().unwrap().host_pid = Some(true),
        "hostPID",
    );
    broken(
        &|d, _| d.spec.template.spec.as_mut().unwrap().service_account_name = Some("default".into()),
        "ServiceAccount",
    );
    broken(
        &|d, _| {
            d.spec
                .template
                .spec
                .as_mut()
                .unwrap()
                .tolerations
                .as_mut()
                .unwrap()
                .retain(|t| t.effect.as_deref() != Some("NoExecute"))
        },
        "NoExecute",
    );
    broken(
        &|d, _| {
            d.spec
                .template
                .spec
                .as_mut()
                .unwrap()
                .tolerations
                .as_mut()
                .unwrap()[0]
                .key = Some("dedicated".into())
        },
        "NoSchedule",
    );
    broken(
        &|d, _| d.spec.template.spec.as_mut().unwrap().priority_class_name = None,
        "priorityClassName",
    );
    broken(
        &|d, _| d.spec.update_strategy.as_mut().unwrap().rolling_update = None,
        "maxUnavailable",
    );
    broken(
        &|d, _| {
            container(d)
                .volume_mounts
                .as_mut()
                .unwrap()
                .retain(|m| m.mount_path != DEFAULT_PIN_DIR)
        },
        "/sys/fs/bpf/pipeguard is not mounted",
    );
    broken(
        &|d, _| container(d).volume_mounts.as_mut().unwrap()[0].mount_path = "/host/sys/fs/cgroup".into(),
        "/sys/fs/cgroup is not mounted",
    );
    broken(
        &|d, _| {
            d.spec.template.spec.as_mut().unwrap().volumes.as_mut().unwrap()[0]
                .host_path
                .as_mut()
                .unwrap()
                .path = "/sys/fs/cgroup/unified".into()
        },
        "hostPath",
    );
    broken(
        &|d, _| {
            for m in container(d).volume_mounts.as_mut().unwrap() {
                m.mount_propagation = None;
            }
        },
        "mountPropagation",
    );
    broken(
        &|d, _| {
            let spec = d.spec.template.spec.as_mut().unwrap();
            let mut root = spec.volumes.as_ref().unwrap()[0].clone();
            root.name = "root".into();
            root.host_path.as_mut().unwrap().path = "/".into();
            spec.volumes.as_mut().unwrap().push(root);
        },
        "not one of the agent's host paths",
    );
    broken(
        &|d, _| {
            container(d)
                .env
                .as_mut()
                .unwrap()
                .retain(|e| e.name != "PIPEGUARD_NODE_NAME")
        },
        "PIPEGUARD_NODE_NAME",
    );
    broken(
        &|d, _| {
            let node = container(d)
                .env
                .as_mut()
                .unwrap()
                .iter_mut()
                .find(|e| e.name == "PIPEGUARD_NODE_NAME")
                .unwrap();
            node.value_from
                .as_mut()
                .unwrap()
                .field_ref
                .as_mut()
                .unwrap()
                .field_path = "metadata.name".into();
        },
        "spec.nodeName",
    );
    broken(&|d, _| container(d).env_from = None, "envFrom");
    broken(
        &|d, _| {
            container(d)
                .env
                .as_mut()
                .unwrap()
                .retain(|e| e.name != "PIPEGUARD_CGROUP_ROOT")
        },
        "PIPEGUARD_CGROUP_ROOT",
    );
    broken(
        &|_, c| {
            drop(
                c.data
                    .as_mut()
                    .unwrap()
                    .insert("PIPEGUARD_PIN_DIR".into(), "/var/lib/pipeguard".into()),
            )
        },
        "pin dir",
    );
    broken(
        &|_, c| {
            drop(
                c.data
                    .as_mut()
                    .unwrap()
                    .insert("PIPEGUARD_LISTEN".into(), "0.0.0.0:8080".into()),
            )
        },
        "PIPEGUARD_LISTEN",
    );
    broken(
        &|_, c| {
            drop(
                c.data
                    .as_mut()
                    .unwrap()
                    .insert("PIPEGUARD_MODE".into(), "enforcing".into()),
            )
        },
        "does not parse",
    );
    broken(
        &|_, c| {
            drop(
                c.data
                    .as_mut()
                    .unwrap()
                    .insert("PIPEGUARD_GUARD_NAMESPACE".into(), "ci".into()),
            )
        },
        "PIPEGUARD_GUARD_NAMESPACE is not",
    );
    broken(
        &|_, c| {
            drop(
                c.data
                    .as_mut()
                    .unwrap()
                    .insert("PIPEGUARD_DEFAULT_DENY_EGRESS".into(), "yes".into()),
            )
        },
        "a switch",
    );
    broken(&|d, _| container(d).args = Some(vec!["exec".into()]), "args");
    broken(
        &|d, _| container(d).ports.as_mut().unwrap()[0].name = Some("metrics".into()),
        "http-metrics",
    );
    broken(
        &|d, _| {
            container(d)
                .liveness_probe
                .as_mut()
                .unwrap()
                .http_get
                .as_mut()
                .unwrap()
                .path = Some("/readyz".into())
        },
        "liveness",
    );
    broken(
        &|d, _| {
            container(d)
                .readiness_probe
                .as_mut()
                .unwrap()
                .http_get
                .as_mut()
                .unwrap()
                .port = IntOrString::Int(8080)
        },
        "readiness",
    );
    broken(&|d, _| container(d).readiness_probe = None, "readiness");
    broken(
        &|d, _| {
            drop(
                d.spec
                    .template
                    .metadata
                    .as_mut()
                    .unwrap()
                    .annotations
                    .as_mut()
                    .unwrap()
                    .remove("prometheus.io/scrape"),
            )
        },
        "Prometheus",
    );
    broken(
        &|d, _| container(d).resources.as_mut().unwrap().limits = None,
        "limits",
    );
    broken(
        &|d, _| d.spec.selector.match_labels = Some(BTreeMap::from([("app".into(), "other".into())])),
        "selector",
    );

    // Example addresses.
    let example: NetworkPolicy =
        typed(&documents(&deploy().join("examples").join(EXAMPLES[0].file))[2]).unwrap();
    assert!(example_address_problems(&example).is_empty());
    let mut real = example.clone();
    real.spec.as_mut().unwrap().egress.as_mut().unwrap()[0]
        .to
        .as_mut()
        .unwrap()[0]
        .ip_block
        .as_mut()
        .unwrap()
        .cidr = "140.82.112.0/20".into();
    assert!(!example_address_problems(&real).is_empty());
    assert!(
        !in_documentation_ranges("192.0.0.0/8"),
        "wider than a documentation range"
    );
    assert!(in_documentation_ranges("203.0.113.10/32"));
}

// ---------------------------------------------------------------------------------------
// deploy/ as a user applies it: rendered by a real kubectl

/// kubectl from `cargo xtask setup` (unpacked from the PyPI kubectl layer package).
fn kubectl() -> std::process::Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/kubectl");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs kubectl for this test)",
        path.display()
    );
    std::process::Command::new(path)
}

/// `kubectl kustomize DIR`, as JSON values.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = kubectl()
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).expect("YAML")).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// A rendered object: the kinds deploy/ holds, plus the kinds it may grow (CRDs), each
/// parsed into its Kubernetes type with no field lost.
fn rendered_problem(doc: &Value) -> Option<String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    match doc["kind"].as_str() {
        Some("CustomResourceDefinition") => typed::<CustomResourceDefinition>(doc).err(),
        _ => document_problem(doc),
    }
}

fn object_id(doc: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&doc["kind"]),
        s(&doc["metadata"]["namespace"]),
        s(&doc["metadata"]["name"]),
    )
}

fn rendered_one<T: DeserializeOwned + Serialize + Resource>(docs: &[Value]) -> T {
    let mut found: Vec<T> = docs
        .iter()
        .filter(|d| d["kind"] == T::KIND)
        .map(|d| typed(d).unwrap_or_else(|e| panic!("rendered {}: {e}", T::KIND)))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {} rendered", T::KIND);
    found.remove(0)
}

#[test]
fn kubectl_kustomize_renders_deploy_into_the_objects_the_files_hold() {
    let rendered = kustomize(&deploy());
    let problems: Vec<String> = rendered
        .iter()
        .filter_map(|d| rendered_problem(d).map(|p| format!("{:?}: {p}", object_id(d))))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");

    // What kubectl installs is exactly what the files listed in the kustomization hold.
    let ids: BTreeSet<_> = rendered.iter().map(object_id).collect();
    assert_eq!(ids.len(), rendered.len(), "an object rendered twice: {ids:#?}");
    let in_files: BTreeSet<_> = manifests()
        .iter()
        .filter(|(f, _)| !f.starts_with(deploy().join("examples")))
        .map(|(_, d)| object_id(d))
        .collect();
    assert_eq!(
        ids, in_files,
        "kubectl kustomize deploy/ against the files in deploy/"
    );

    // The checks above, on what kubectl rendered rather than on the files.
    let ds: DaemonSet = rendered_one(&rendered);
    let config: ConfigMap = rendered_one(&rendered);
    let problems = daemonset_problems(&ds, &config);
    assert!(problems.is_empty(), "{problems:#?}");
    let role: ClusterRole = rendered_one(&rendered);
    let binding: ClusterRoleBinding = rendered_one(&rendered);
    let problems = rbac_problems(&role, &binding);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The README's way to run your own image: an overlay with kustomize's `images:`
/// transformer over deploy/ points the DaemonSet at it.
#[test]
fn a_kustomize_overlay_points_the_daemonset_at_your_image() {
    // kustomize takes bases by relative path only: the overlay lives in target/.
    let overlay = deploy().join(format!("../target/pg-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&overlay).unwrap();
    let base = "../../deploy";
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {base}\n\
             images:\n  - name: ghcr.io/pipeguard/pipeguard\n    newName: registry.example.com/ci/pipeguard\n    newTag: \"1.2.3\"\n"
        ),
    )
    .unwrap();
    let rendered = kustomize(&overlay);
    let _ = std::fs::remove_dir_all(&overlay);
    let ds: DaemonSet = rendered_one(&rendered);
    let images: Vec<Option<String>> = pod_spec(&ds).containers.iter().map(|c| c.image.clone()).collect();
    assert_eq!(
        images,
        vec![Some("registry.example.com/ci/pipeguard:1.2.3".to_string())],
        "the overlay's image"
    );
}
