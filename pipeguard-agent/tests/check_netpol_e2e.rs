//! The upstream Kubernetes network policy e2e cases (test/e2e/network/netpol) that are about
//! which traffic is allowed, re-expressed in the same world: namespaces x, y, z with pods
//! a, b, c, each serving ports 80 and 81 over TCP, UDP and SCTP with named ports
//! `serve-<port>-<proto>`. Each case writes its policies, runs the real `pipeguard check
//! --matrix` and compares the truth table with the upstream expectation.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn ip(ns: &str, pod: &str) -> String {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap();
    let p = PODS.iter().position(|x| *x == pod).unwrap();
    format!("10.0.{n}.{}", p + 1)
}

fn cluster_yaml() -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        ));
    }
    for ns in NAMESPACES {
        for pod in PODS {
            let mut ports = String::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    ports.push_str(&format!(
                        "        - {{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}\n",
                        proto.to_lowercase()
                    ));
                }
            }
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n    - name: c{port}\n      image: agnhost\n      ports:\n{ports}status: {{podIP: {}, podIPs: [{{ip: {}}}]}}\n",
                ip(ns, pod),
                ip(ns, pod),
                port = 80
            ));
        }
    }
    out
}

struct World {
    dir: PathBuf,
}

impl World {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pg-check-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("cluster.yaml"), cluster_yaml()).unwrap();
        Self { dir }
    }

    fn policies(&self, yaml: &str) -> &Self {
        std::fs::write(self.dir.join("policies/p.yaml"), yaml).unwrap();
        self
    }

    fn check(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_pipeguard"))
            .arg("check")
            .arg("--policies")
            .arg(self.dir.join("policies"))
            .arg("--cluster")
            .arg(self.dir.join("cluster.yaml"))
            .args(args)
            .output()
            .unwrap()
    }

    fn matrix(&self, port: u16, protocol: &str) -> BTreeMap<(String, String), bool> {
        let out = self.check(&["--matrix", "--port", &port.to_string(), "--protocol", protocol]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        parse_matrix(&String::from_utf8(out.stdout).unwrap())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_matrix(text: &str) -> BTreeMap<(String, String), bool> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').skip(1).collect();
    let mut m = BTreeMap::new();
    for line in lines {
        let mut cells = line.split('\t');
        let from = cells.next().unwrap();
        for (to, cell) in header.iter().zip(cells) {
            m.insert((from.to_string(), to.to_string()), cell == ".");
        }
    }
    m
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// The upstream Reachability helper, in miniature.
struct Expect(BTreeMap<(String, String), bool>);

impl Expect {
    fn all(v: bool) -> Self {
        let mut m = BTreeMap::new();
        for f in all_pods() {
            for t in all_pods() {
                m.insert((f.clone(), t), v);
            }
        }
        Self(m)
    }
    /// Every (from, to) where `from` and `to` match the predicates gets `v`.
    fn peer(mut self, from: impl Fn(&str) -> bool, to: impl Fn(&str) -> bool, v: bool) -> Self {
        for ((f, t), cell) in self.0.iter_mut() {
            if from(f) && to(t) {
                *cell = v;
            }
        }
        self
    }
    fn ingress(self, to: &str, v: bool) -> Self {
        let to = to.to_string();
        self.peer(|_| true, move |t| t == to, v)
    }
    fn egress(self, from: &str, v: bool) -> Self {
        let from = from.to_string();
        self.peer(move |f| f == from, |_| true, v)
    }
    fn set(mut self, from: &str, to: &str, v: bool) -> Self {
        self.0.insert((from.to_string(), to.to_string()), v);
        self
    }
}

fn in_ns(ns: &'static str) -> impl Fn(&str) -> bool {
    move |p: &str| p.starts_with(&format!("{ns}/"))
}

#[track_caller]
fn assert_matrix(world: &World, port: u16, protocol: &str, expected: Expect) {
    let got = world.matrix(port, protocol);
    let wrong: Vec<String> = expected
        .0
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|((f, t), v)| {
            format!(
                "{f} -> {t}: expected {}, got {:?}",
                if *v { "." } else { "X" },
                got.get(&(f.clone(), t.clone()))
            )
        })
        .collect();
    assert!(wrong.is_empty(), "port {port}/{protocol}:\n{}", wrong.join("\n"));
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

#[test]
fn default_deny_ingress() {
    let w = World::new("deny-ingress");
    w.policies(&np("x", "deny", "  podSelector: {}\n  policyTypes: [Ingress]\n"));
    assert_matrix(&w, 80, "TCP", Expect::all(true).peer(|_| true, in_ns("x"), false));
}

#[test]
fn default_deny_all() {
    let w = World::new("deny-all");
    w.policies(&np(
        "x",
        "deny",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    ));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .peer(|_| true, in_ns("x"), false)
            .peer(in_ns("x"), |_| true, false),
    );
}

#[test]
fn allow_ingress_from_pods_in_server_namespace_by_pod_selector() {
    let w = World::new("pod-sel");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true).ingress("x/a", false).set("x/b", "x/a", true),
    );
}

#[test]
fn allow_ingress_from_all_namespaces() {
    let w = World::new("all-ns");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n",
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true));
}

#[test]
fn allow_ingress_only_from_a_different_namespace() {
    let w = World::new("ns-sel");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .peer(in_ns("y"), |t| t == "x/a", true),
    );
}

#[test]
fn pod_selector_with_match_expressions() {
    let w = World::new("pod-expr");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true).ingress("x/a", false).set("x/b", "x/a", true),
    );
}

#[test]
fn namespace_selector_with_match_expressions() {
    let w = World::new("ns-expr");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y]}]}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .peer(in_ns("y"), |t| t == "x/a", true),
    );
}

#[test]
fn pod_selector_or_namespace_selector() {
    let w = World::new("or");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}, {namespaceSelector: {matchLabels: {ns: y}}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .set("x/b", "x/a", true)
            .peer(in_ns("y"), |t| t == "x/a", true),
    );
}

#[test]
fn pod_selector_and_namespace_selector() {
    let w = World::new("and");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {matchLabels: {ns: y}}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true).ingress("x/a", false).set("y/b", "x/a", true),
    );
}

#[test]
fn multiple_pod_selectors_and_namespace_selectors() {
    let w = World::new("multi");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]\n"));
    let expected = Expect::all(true).ingress("x/a", false);
    let expected = ["y/b", "y/c", "z/b", "z/c"]
        .iter()
        .fold(expected, |e, f| e.set(f, "x/a", true));
    assert_matrix(&w, 80, "TCP", expected);
}

#[test]
fn ports_restrict_ingress() {
    let w = World::new("ports");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81, protocol: TCP}]}]\n"));
    assert_matrix(&w, 80, "TCP", Expect::all(true).ingress("x/a", false));
    assert_matrix(
        &w,
        81,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .peer(in_ns("y"), |t| t == "x/a", true),
    );
}

#[test]
fn stacked_policies_with_overlapping_pod_selectors() {
    let w = World::new("stacked");
    w.policies(&format!(
        "{}{}",
        np("x", "p80", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n"),
        np("x", "p81", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81}]}]\n")
    ));
    // Port 80: only p80 admits it, and only to x/a; p81 isolates every pod in x.
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .peer(|_| true, in_ns("x"), false)
            .peer(in_ns("y"), |t| t == "x/a", true),
    );
    assert_matrix(
        &w,
        81,
        "TCP",
        Expect::all(true)
            .peer(|_| true, in_ns("x"), false)
            .peer(in_ns("y"), in_ns("x"), true),
    );
}

#[test]
fn allow_all_ingress() {
    let w = World::new("allow-all");
    w.policies(&np("x", "p", "  podSelector: {}\n  ingress: [{}]\n"));
    assert_matrix(&w, 80, "TCP", Expect::all(true));
}

#[test]
fn ingress_on_one_named_port() {
    let w = World::new("named");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: serve-81-tcp}]}]\n",
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true).ingress("x/a", false));
    assert_matrix(&w, 81, "TCP", Expect::all(true));
}

#[test]
fn ingress_from_namespace_on_one_named_port() {
    let w = World::new("named-ns");
    w.policies(&np("x", "p", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: serve-80-tcp}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .peer(|_| true, in_ns("x"), false)
            .peer(in_ns("y"), in_ns("x"), true),
    );
    assert_matrix(&w, 81, "TCP", Expect::all(true).peer(|_| true, in_ns("x"), false));
}

#[test]
fn egress_on_one_named_port() {
    let w = World::new("egress-named");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-80-tcp}]}]\n"));
    assert_matrix(&w, 80, "TCP", Expect::all(true));
    assert_matrix(&w, 81, "TCP", Expect::all(true).egress("x/a", false));
}

#[test]
fn deny_egress_by_pod_selector() {
    let w = World::new("deny-egress-pod");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: []\n",
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true).egress("x/a", false));
}

#[test]
fn deny_egress_from_all_pods_in_a_namespace() {
    let w = World::new("deny-egress-ns");
    w.policies(&np("x", "p", "  podSelector: {}\n  policyTypes: [Egress]\n"));
    assert_matrix(&w, 80, "TCP", Expect::all(true).peer(in_ns("x"), |_| true, false));
}

#[test]
fn ingress_and_egress_together() {
    let w = World::new("both");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
    ));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .egress("x/a", false)
            .set("x/b", "x/a", true)
            .set("x/a", "x/b", true),
    );
}

#[test]
fn client_side_egress_deny_wins_over_server_allow() {
    let w = World::new("client-deny");
    w.policies(&format!(
        "{}{}",
        np("y", "allow-all", "  podSelector: {}\n  ingress: [{}]\n"),
        np(
            "x",
            "deny-egress",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n"
        )
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true).egress("x/a", false));
}

#[test]
fn egress_to_a_server_in_another_namespace_by_pod_and_namespace_selector() {
    let w = World::new("egress-and");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true).egress("x/a", false).set("x/a", "y/b", true),
    );
}

#[test]
fn ingress_any_port_on_a_specific_protocol() {
    let w = World::new("proto-any-port");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: UDP}]}]\n",
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true).ingress("x/a", false));
    assert_matrix(&w, 80, "UDP", Expect::all(true));
    assert_matrix(&w, 81, "UDP", Expect::all(true));
}

#[test]
fn ingress_allow_all_takes_precedence_over_deny_all() {
    let w = World::new("ingress-precedence");
    w.policies(&format!(
        "{}{}",
        np(
            "x",
            "deny",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n"
        ),
        np(
            "x",
            "allow",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{}]\n"
        )
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true));
}

#[test]
fn egress_allow_all_takes_precedence_over_deny_all() {
    let w = World::new("egress-precedence");
    w.policies(&format!(
        "{}{}",
        np(
            "x",
            "deny",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: []\n"
        ),
        np(
            "x",
            "allow",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{}]\n"
        )
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true));
}

#[test]
fn egress_to_a_cidr_block() {
    let w = World::new("cidr");
    w.policies(&np("x", "p", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {{cidr: {}/32}}}}]}}]\n", ip("y", "b"))));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true).egress("x/a", false).set("x/a", "y/b", true),
    );
}

#[test]
fn egress_cidr_with_except() {
    let w = World::new("except");
    w.policies(&np("x", "p", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {{cidr: 10.0.1.0/24, except: [{}/32]}}}}]}}]\n", ip("y", "b"))));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .egress("x/a", false)
            .set("x/a", "y/a", true)
            .set("x/a", "y/c", true),
    );
}

#[test]
fn an_ip_in_both_cidr_and_except_is_allowed_by_another_rule() {
    let w = World::new("except-overlap");
    let spec = format!(
        "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.0.1.0/24, except: [{b}/32]}}}}]\n  - to: [{{ipBlock: {{cidr: {b}/32}}}}]\n",
        b = ip("y", "b")
    );
    w.policies(&np("x", "p", &spec));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .egress("x/a", false)
            .peer(|f| f == "x/a", in_ns("y"), true),
    );
}

#[test]
fn sctp_is_not_tcp() {
    let w = World::new("sctp");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]\n",
    ));
    assert_matrix(&w, 80, "TCP", Expect::all(true).ingress("x/a", false));
    assert_matrix(&w, 80, "SCTP", Expect::all(true));
}

#[test]
fn only_udp_means_no_tcp() {
    let w = World::new("udp-only");
    w.policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: UDP, port: 81}]}]\n",
    ));
    assert_matrix(&w, 81, "TCP", Expect::all(true).ingress("x/a", false));
    assert_matrix(&w, 81, "UDP", Expect::all(true));
}

#[test]
fn namespace_selector_on_the_default_name_label() {
    let w = World::new("default-label");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .peer(in_ns("y"), |t| t == "x/a", true),
    );
}

#[test]
fn namespace_match_expressions_on_the_default_name_label() {
    let w = World::new("default-label-expr");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}]}}]}]\n"));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true).peer(in_ns("y"), |t| t == "x/a", false),
    );
}

#[test]
fn end_port_ranges() {
    let w = World::new("endport");
    w.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: TCP, port: 79, endPort: 80}]}]\n"));
    assert_matrix(&w, 80, "TCP", Expect::all(true));
    assert_matrix(&w, 81, "TCP", Expect::all(true).ingress("x/a", false));
}

#[test]
fn ingress_and_egress_are_controlled_independently() {
    let w = World::new("independent");
    w.policies(&format!(
        "{}{}",
        np("x", "deny-ingress", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n"),
        np("x", "allow-egress-y", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n")
    ));
    assert_matrix(
        &w,
        80,
        "TCP",
        Expect::all(true)
            .ingress("x/a", false)
            .egress("x/a", false)
            .peer(|f| f == "x/a", in_ns("y"), true),
    );
}

// Single answers: verdicts, JSON fields, exit codes, named ports and outside IPs.

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn single_answers_in_json_with_exit_codes() {
    let w = World::new("single");
    w.policies(&format!(
        "{}{}",
        np("x", "only-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: serve-81-tcp}]}]\n"),
        np("y", "egress-cidr", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24}}], ports: [{port: 443}]}]\n")
    ));
    let allowed = w.check(&["--from", "x/b", "--to", "x/a", "--port", "serve-81-tcp", "--json"]);
    assert_eq!(allowed.status.code(), Some(0));
    let j = json(&allowed);
    assert_eq!(
        (j["verdict"].as_str(), j["egress"].as_str(), j["ingress"].as_str()),
        (Some("allow"), Some("allow"), Some("allow"))
    );
    assert_eq!(j["policies"], serde_json::json!(["x/only-b"]));

    let denied = w.check(&["--from", "x/c", "--to", "x/a", "--port", "81", "--json"]);
    assert_eq!(denied.status.code(), Some(1));
    let j = json(&denied);
    assert_eq!(
        (j["verdict"].as_str(), j["ingress"].as_str()),
        (Some("deny"), Some("deny"))
    );
    assert_eq!(j["policies"], serde_json::json!(["x/only-b"]));
    assert!(j["reason"].as_str().unwrap().contains("ingress of x/a"), "{j}");

    let outside = w.check(&["--from", "y/a", "--to", "192.0.2.7", "--port", "443", "--json"]);
    assert_eq!(outside.status.code(), Some(0));
    let j = json(&outside);
    assert_eq!(
        (j["egress"].as_str(), j["ingress"].as_str()),
        (Some("allow"), Some("n/a"))
    );
    let wrong_port = w.check(&["--from", "y/a", "--to", "192.0.2.7", "--port", "80"]);
    assert_eq!(wrong_port.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong_port.stdout).contains("egress:  deny"));
}

#[test]
fn bad_input_is_an_error_with_exit_2() {
    let w = World::new("errors");
    w.policies(&np(
        "x",
        "bad",
        "  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: 79}]}]\n",
    ));
    let out = w.check(&["--from", "x/a", "--to", "x/b", "--port", "80"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "networkpolicy x/bad: spec.ingress[0].ports[0].endPort: endPort 79 is less than port 80"
        ),
        "{err}"
    );

    let w = World::new("errors2");
    w.policies(&np("x", "ok", "  podSelector: {}\n  ingress: [{}]\n"));
    for (args, needle) in [
        (
            &["--from", "x/nope", "--to", "x/b", "--port", "80"][..],
            "pod x/nope is not in the cluster snapshot",
        ),
        (
            &["--from", "x/a", "--to", "x/b", "--port", "no-such-port"][..],
            "no container port named \"no-such-port\"",
        ),
        (
            &["--from", "xa", "--to", "x/b", "--port", "80"][..],
            "expected NAMESPACE/POD",
        ),
    ] {
        let out = w.check(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = w.check(&[
        "--from",
        "x/a",
        "--to",
        "x/b",
        "--port",
        "80",
        "--protocol",
        "ICMP",
    ]);
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown protocol");
}

#[test]
fn the_matrix_prints_like_the_upstream_truth_tables() {
    let w = World::new("print");
    w.policies(&np(
        "x",
        "deny",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n",
    ));
    let out = w.check(&["--matrix"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let first_two: Vec<&str> = text.lines().take(2).collect();
    assert_eq!(first_two[0], "-\tx/a\tx/b\tx/c\ty/a\ty/b\ty/c\tz/a\tz/b\tz/c");
    assert_eq!(first_two[1], "x/a\tX\t.\t.\t.\t.\t.\t.\t.\t.");
    assert_eq!(text.lines().count(), 10);
}
