//! `pipeguard check --to-name` through the real binary: which domain rule allows a name,
//! why a name is refused, exit codes (0 allow, 1 deny, 2 error), JSON, and domain
//! policies isolating egress in the pod-to-pod answers too.

use std::{path::PathBuf, process::Command};

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: ci, labels: {team: ci}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: runner, namespace: ci, labels: {app: runner}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: ci, labels: {app: web}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: x, namespace: other, labels: {app: x}}
status: {podIP: 10.0.1.1}
";

const POLICIES: &str = "
apiVersion: pipeguard.dev/v1alpha1
kind: DomainPolicy
metadata: {name: build, namespace: ci}
spec:
  podSelector: {matchLabels: {app: runner}}
  egress:
  - domains: [github.com, '*.githubusercontent.com']
    ports: [{port: 443}]
  - domains: [registry.npmjs.org]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: ci}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-open, namespace: ci}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]
    ports: [{port: 443}]
";

struct World {
    dir: PathBuf,
}

impl World {
    fn new(name: &str, policies: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pg-check-domain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
        std::fs::write(dir.join("policies/p.yaml"), policies).unwrap();
        Self { dir }
    }

    fn add(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.join("policies").join(file), yaml).unwrap();
    }

    /// (exit code, stdout, stderr)
    fn check(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_pipeguard"))
            .arg("check")
            .arg("--policies")
            .arg(self.dir.join("policies"))
            .arg("--cluster")
            .arg(self.dir.join("cluster.yaml"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    fn name(&self, from: &str, name: &str, port: u16) -> (i32, String, String) {
        self.check(&["--from", from, "--to-name", name, "--port", &port.to_string()])
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[track_caller]
fn assert_answer(out: (i32, String, String), code: i32, lines: &[&str]) {
    let (status, stdout, stderr) = out;
    assert_eq!(status, code, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in lines {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn allowed_names_say_which_rule_allows_them() {
    let w = World::new("allow", POLICIES);
    assert_answer(
        w.name("ci/runner", "github.com", 443),
        0,
        &[
            "verdict: allow",
            "policies: DomainPolicy ci/build",
            "rule: DomainPolicy ci/build spec.egress[0].domains[0] (github.com)",
        ],
    );
    assert_answer(
        w.name("ci/runner", "Raw.GitHubUserContent.com.", 443),
        0,
        &["rule: DomainPolicy ci/build spec.egress[0].domains[1] (*.githubusercontent.com)"],
    );
    assert_answer(
        w.name("ci/runner", "registry.npmjs.org", 8080),
        0,
        &["rule: DomainPolicy ci/build spec.egress[1].domains[0] (registry.npmjs.org)"],
    );
    // Nothing isolates other/x: everything is allowed, no rule needed.
    assert_answer(
        w.name("other/x", "evil.example", 443),
        0,
        &["verdict: allow", "reason: no policy isolates egress of other/x"],
    );
}

#[test]
fn refused_names_say_why() {
    let w = World::new("deny", POLICIES);
    // The wildcard never matches the suffix itself: the query is refused.
    assert_answer(
        w.name("ci/runner", "githubusercontent.com", 443),
        1,
        &[
            "verdict: deny",
            "is DNS-filtered and no domain rule names githubusercontent.com",
        ],
    );
    assert_answer(
        w.name("ci/runner", "exfil.attacker.example", 443),
        1,
        &["its DNS query is refused", "policies: DomainPolicy ci/build"],
    );
    assert_answer(
        w.name("ci/runner", "github.com", 80),
        1,
        &["domain rules name github.com, but not on 80/TCP", "ipBlock"],
    );
    assert_answer(
        w.check(&[
            "--from",
            "ci/runner",
            "--to-name",
            "github.com",
            "--port",
            "443",
            "--protocol",
            "UDP",
        ]),
        1,
        &["but not on 443/UDP"],
    );
}

#[test]
fn ip_rules_that_allow_everything_allow_names_too() {
    let w = World::new("ip", POLICIES);
    assert_answer(
        w.name("ci/web", "anything.example", 443),
        0,
        &[
            "verdict: allow",
            "policies: ci/web-open",
            "allows every address in 0.0.0.0/0 on 443/TCP",
        ],
    );
    assert_answer(
        w.name("ci/web", "anything.example", 80),
        1,
        &[
            "no domain rule names anything.example",
            "only an ipBlock covering the addresses",
        ],
    );
}

#[test]
fn a_name_needs_a_resolver_the_network_policies_allow() {
    let without_dns = POLICIES.replace("name: dns, namespace: ci", "name: dns, namespace: elsewhere");
    let w = World::new("nodns", &without_dns);
    assert_answer(
        w.name("ci/runner", "github.com", 443),
        1,
        &[
            "verdict: deny",
            "rule: DomainPolicy ci/build spec.egress[0].domains[0] (github.com)",
            "but no NetworkPolicy allows ci/runner DNS (port 53), so it cannot resolve it",
        ],
    );
}

#[test]
fn json_carries_the_rule() {
    let w = World::new("json", POLICIES);
    let (code, stdout, _) = w.check(&[
        "--from",
        "ci/runner",
        "--to-name",
        "github.com",
        "--port",
        "443",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["egress"], "allow");
    assert_eq!(v["ingress"], "n/a");
    assert_eq!(
        v["rule"],
        "DomainPolicy ci/build spec.egress[0].domains[0] (github.com)"
    );
    let (code, stdout, _) = w.check(&[
        "--from",
        "ci/runner",
        "--to-name",
        "evil.example",
        "--port",
        "443",
        "--json",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["verdict"], "deny");
    assert!(v.get("rule").is_none(), "{v}");
}

#[test]
fn cluster_domain_policies_add_names_by_namespace_labels() {
    let w = World::new("cluster", POLICIES);
    assert_answer(w.name("ci/runner", "ghcr.io", 443), 1, &["verdict: deny"]);
    w.add(
        "platform.yaml",
        "apiVersion: pipeguard.dev/v1alpha1\nkind: ClusterDomainPolicy\nmetadata: {name: platform}\nspec:\n  namespaceSelector: {matchLabels: {team: ci}}\n  podSelector: {}\n  egress:\n  - domains: [ghcr.io]\n",
    );
    assert_answer(
        w.name("ci/runner", "ghcr.io", 443),
        0,
        &["rule: ClusterDomainPolicy platform spec.egress[0].domains[0] (ghcr.io)"],
    );
    // It selects ci/web too, which it now DNS-filters: names outside its rules are refused
    // although web-open allows every address on 443.
    assert_answer(
        w.name("ci/web", "anything.example", 443),
        1,
        &["ci/web is DNS-filtered", "ClusterDomainPolicy platform"],
    );
}

#[test]
fn a_domain_policy_isolates_pod_to_pod_egress_too() {
    let w = World::new("isolate", POLICIES);
    let (code, stdout, _) = w.check(&["--from", "ci/runner", "--to", "other/x", "--port", "80"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("DomainPolicy ci/build"), "{stdout}");
    let (code, _, _) = w.check(&["--from", "other/x", "--to", "ci/runner", "--port", "80"]);
    assert_eq!(code, 0);
}

#[test]
fn errors_exit_2_and_name_the_file_object_and_field() {
    let w = World::new("errors", POLICIES);
    let (code, _, stderr) = w.name("ci/runner", "*.github.com", 443);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a *. pattern"), "{stderr}");
    let (code, _, stderr) = w.name("ci/runner", "bad name", 443);
    assert_eq!(code, 2);
    assert!(stderr.contains("' ' is not allowed"), "{stderr}");
    let (code, _, stderr) = w.check(&[
        "--from",
        "ci/runner",
        "--to-name",
        "github.com",
        "--port",
        "https",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("numeric --port"), "{stderr}");
    w.add(
        "bad.yaml",
        "apiVersion: pipeguard.dev/v1alpha1\nkind: DomainPolicy\nmetadata: {name: bad, namespace: ci}\nspec:\n  podSelector: {}\n  egress:\n  - domains: [ok.example, 'no..pe']\n",
    );
    let (code, _, stderr) = w.name("ci/runner", "github.com", 443);
    assert_eq!(code, 2);
    let file = w.dir.join("policies/bad.yaml");
    assert!(
        stderr.contains(&format!(
            "{}: domainpolicy ci/bad: spec.egress[0].domains[1]: \"no..pe\" has an empty label",
            file.display()
        )),
        "{stderr}"
    );
}

#[test]
fn public_doh_resolvers_are_warned_about() {
    let w = World::new(
        "doh",
        &POLICIES.replace("registry.npmjs.org]", "registry.npmjs.org, dns.google]"),
    );
    let (code, _, stderr) = w.name("ci/runner", "dns.google", 443);
    assert_eq!(code, 0);
    assert!(
        stderr.contains("warning:")
            && stderr.contains("domainpolicy ci/build: spec.egress[1].domains[1]")
            && stderr.contains("DNS-over-HTTPS resolver dns.google"),
        "{stderr}"
    );
}
