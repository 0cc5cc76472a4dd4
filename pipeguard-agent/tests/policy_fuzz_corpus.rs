//! The fuzz target's property, run on its seed corpus and on every input it ever crashed on
//! (kept under fuzz/regressions after the fix), so a fixed crash stays fixed in plain
//! `cargo test`.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use pipeguard::policy::{Egress, PodIdentity, egress_for, evaluate, lookup, lpm_entries, parse_policies};

/// Parsing never panics; errors name their source; compiled tries equal the reference.
fn property(text: &str) {
    let set = parse_policies("input.yaml", text);
    for error in &set.errors {
        assert!(error.to_string().starts_with("input.yaml"), "{error}");
    }
    for policy in &set.policies {
        let pod = PodIdentity {
            namespace: policy.namespace.clone(),
            name: "job".into(),
            labels: BTreeMap::new(),
        };
        let Egress::Isolated { rules, .. } = egress_for(&set, &pod, None) else {
            continue;
        };
        let Ok(entries) = lpm_entries(&rules) else {
            continue;
        };
        let probes: Vec<IpAddr> = rules
            .iter()
            .flat_map(|r| std::iter::once(&r.cidr).chain(&r.except))
            .flat_map(|n| [n.network(), n.broadcast()])
            .collect();
        for ip in probes {
            for (proto, port) in [(6u8, 443u16), (17, 53), (132, 9), (1, 0)] {
                let kernel = lookup(&entries, ip).is_some_and(|p| p.allows(proto, port));
                assert_eq!(
                    kernel,
                    evaluate(&rules, ip, proto, port),
                    "{ip} {proto}/{port} in:\n{text}"
                );
            }
        }
    }
}

fn run_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            property(text);
        }
        n += 1;
    }
    n
}

#[test]
fn seed_corpus_and_regressions_hold_the_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = run_dir(&fuzz.join("corpus/policy_compile"));
    assert!(seeds >= 2, "the seed corpus is missing ({seeds} files)");
    run_dir(&fuzz.join("regressions/policy_compile"));
}

#[test]
fn thousands_of_policies_and_huge_documents_are_handled() {
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ci}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n",
            i / 256,
            i % 256
        ));
    }
    let set = parse_policies("many.yaml", &text);
    assert_eq!((set.policies.len(), set.errors.len()), (3000, 0));
    let pod = PodIdentity {
        namespace: "ci".into(),
        name: "job".into(),
        labels: BTreeMap::new(),
    };
    let Egress::Isolated { rules, .. } = egress_for(&set, &pod, None) else {
        panic!("isolated")
    };
    assert_eq!(lpm_entries(&rules).unwrap().v4.len(), 3000);

    // Over the size limit: one clear error, nothing parsed.
    let dir = std::env::temp_dir().join(format!("pg-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let huge = dir.join("huge.yaml");
    std::fs::write(&huge, "#".repeat(5 << 20)).unwrap();
    let set = pipeguard::policy::load_policies(&[huge]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(set.errors.len(), 1);
    assert!(
        set.errors[0].to_string().contains("the limit is"),
        "{}",
        set.errors[0]
    );

    // Deeply nested YAML does not overflow the stack.
    let deep = format!("{}{}", "[".repeat(20000), "]".repeat(20000));
    let set = parse_policies("deep.yaml", &deep);
    assert_eq!(set.policies.len(), 0);
}
