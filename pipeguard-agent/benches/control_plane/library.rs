//! Parse, compile and sync timed on their own, through the library, in this process.

use std::time::{Duration, Instant};

use std::sync::Arc;

use pipeguard::{
    agent::{raw_policy::RawPolicy, snapshot::PolicyCache},
    engine::{Engine, EngineConfig, PolicyEntries},
    policy::{self, Egress, PodIdentity},
};
use serde_json::json;

use super::report::{Report, summarize};

pub const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// `n` distinct prefixes, /16 to /32, inside 10.0.0.0/8; the seed picks the set, so the
/// incremental and the full-rebuild changes are the same in every run.
pub fn cidrs(n: usize, seed: u64) -> Vec<String> {
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut seen = std::collections::HashSet::with_capacity(n);
    while seen.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = 16 + (state % 17) as u32;
        let addr = (10u32 << 24) | ((state >> 20) as u32 & 0x00ff_ffff);
        let addr = if len == 32 {
            addr
        } else {
            addr & !(u32::MAX >> len)
        };
        seen.insert((addr, len));
    }
    let mut out: Vec<(u32, u32)> = seen.into_iter().collect();
    out.sort_unstable();
    out.into_iter()
        .map(|(a, l)| format!("{}/{l}", std::net::Ipv4Addr::from(a)))
        .collect()
}

/// One NetworkPolicy in namespace `ci` selecting every pod, one `ipBlock` per CIDR.
pub fn policy_yaml(cidrs: &[String]) -> String {
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bulk, namespace: ci}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n",
    );
    for c in cidrs {
        y.push_str("    - ipBlock: {cidr: \"");
        y.push_str(c);
        y.push_str("\"}\n");
    }
    y
}

fn compile(set: &policy::PolicySet) -> PolicyEntries {
    let pod = PodIdentity {
        namespace: "ci".into(),
        name: "runner".into(),
        labels: Default::default(),
    };
    let Egress::Isolated { rules, .. } = policy::egress_for(set, &pod, None) else {
        panic!("the bench policy selects the pod");
    };
    let entries = policy::lpm_entries(&rules).expect("the bench policy compiles");
    PolicyEntries {
        v4: entries.v4,
        v6: entries.v6,
        names: Vec::new(),
        ingress: None,
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

pub fn run(quick: bool, report: &mut Report) {
    let reps = if quick { 1 } else { 5 };
    report.section(
        "5c. Control plane through the library: each step on its own (median (min–max) of the repetitions)",
        &[
            "CIDRs",
            "parse YAML",
            "parse an API object (as the agent does)",
            "compile (select + LPM entries)",
            "sync: write all",
            "incremental: ±1 CIDR in place",
            "full rebuild: every CIDR replaced in place",
            "delete all",
        ],
    );
    let mut engine = Engine::load(&EngineConfig::default()).expect("load the eBPF programs");
    let mut figures = Vec::new();
    for n in SIZES {
        let (a, b) = (cidrs(n, 1), cidrs(n, 2));
        let yaml_a = policy_yaml(&a);
        let mut plus_one = a.clone();
        plus_one.push("192.0.2.1/32".into());
        let entries_b = compile(&policy::parse_policies("b", &policy_yaml(&b)));
        let entries_plus = compile(&policy::parse_policies("a+1", &policy_yaml(&plus_one)));
        // As the API server sends it: JSON text.
        let json = serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(&yaml_a).expect("YAML"))
            .expect("JSON");
        let object: RawPolicy = serde_json::from_str(&json).expect("a NetworkPolicy object");
        let object = vec![Arc::new(object)];
        let mut t: [Vec<Duration>; 7] = Default::default();
        for _ in 0..reps {
            let (set, parse) = timed(|| policy::parse_policies("a", &yaml_a));
            assert!(set.errors.is_empty(), "{:?}", set.errors);
            // A fresh cache: the object is new to it, as after a watch event.
            let (from_api, parse_api) = timed(|| PolicyCache::default().policies(&object));
            assert!(from_api.errors.is_empty(), "{:?}", from_api.errors);
            let (entries_a, compile_time) = timed(|| compile(&set));
            let id = 7;
            let ((), write) = timed(|| engine.put_policy(id, &entries_a).expect("put"));
            let (added, incremental) = timed(|| {
                engine
                    .replace_policy(id, &entries_a, &entries_plus)
                    .expect("replace")
            });
            assert_eq!(added, (1, 0), "one CIDR more is one write");
            let ((), back) = timed(|| {
                engine
                    .replace_policy(id, &entries_plus, &entries_a)
                    .map(drop)
                    .expect("replace")
            });
            let ((), rebuild) = timed(|| {
                engine
                    .replace_policy(id, &entries_a, &entries_b)
                    .map(drop)
                    .expect("replace")
            });
            let ((), delete) = timed(|| engine.delete_policy(id, &entries_b).expect("delete"));
            for (slot, d) in t.iter_mut().zip([
                parse,
                parse_api,
                compile_time,
                write,
                incremental,
                rebuild,
                delete,
            ]) {
                slot.push(d);
            }
            t[4].push(back);
        }
        let s: Vec<_> = t.iter().map(|v| summarize(v)).collect();
        report.row(
            std::iter::once(format!("{}k", n / 1000))
                .chain(s.iter().map(|x| x.cell()))
                .collect(),
        );
        figures.push(json!({
            "cidrs": n,
            "parse_yaml": s[0].json(),
            "parse_api_object": s[1].json(),
            "compile": s[2].json(),
            "sync_write_all": s[3].json(),
            "incremental_in_place": s[4].json(),
            "full_rebuild_in_place": s[5].json(),
            "delete_all": s[6].json(),
        }));
    }
    report.figure("library", json!(figures));
}
