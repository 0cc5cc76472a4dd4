//! `dns_tunnel`: data smuggled out in DNS query names. Fed query names; raises once per
//! base domain per window when one of these holds (published detectors use 52 characters,
//! length above mean + 2σ, or 100 distinct subdomains in 5 minutes; these thresholds keep
//! the fixed ones, which need no per-domain history):
//! - a label longer than 52 characters (legitimate labels rarely pass 40; the limit is 63);
//! - the subdomain part (the name minus its base domain) is at least 24 characters with a
//!   Shannon entropy of at least 4.0 bits per character (base32/base64 payloads; words and
//!   short hashes stay below);
//! - more than 100 distinct subdomains of one base domain in 5 minutes.
//!
//! Counted per pod: one job's queries never add to another's.
//!
//! The base domain is the last two labels, three under a two-letter country TLD whose second
//! label is a generic one (example.co.uk). Memory: at most `MAX_DOMAINS` domains with at most
//! `distinct_limit + 1` subdomain hashes each; O(name length) per query, names are ≤ 253.

use std::{
    collections::{HashMap, HashSet, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DnsTunnelConfig {
    pub max_label: usize,
    pub entropy_min_len: usize,
    pub entropy_bits: f64,
    pub distinct_limit: usize,
    pub window: Duration,
}

impl Default for DnsTunnelConfig {
    fn default() -> Self {
        Self {
            max_label: 52,
            entropy_min_len: 24,
            entropy_bits: 4.0,
            distinct_limit: 100,
            window: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum TunnelSign {
    LongLabel { length: usize },
    HighEntropy { bits_per_char: f64, length: usize },
    ManySubdomains { distinct: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct TunnelAlert {
    pub domain: String,
    pub sign: TunnelSign,
}

const MAX_DOMAINS: usize = 1024;

struct DomainWindow {
    opened: Instant,
    subdomains: HashSet<u64>,
    raised: bool,
}

pub struct DnsTunnel {
    config: DnsTunnelConfig,
    /// (pod cgroup id, base domain) → its window.
    domains: HashMap<(u64, String), DomainWindow>,
}

/// The registrable part of a name, approximately (see the module comment).
pub fn base_domain(name: &str) -> &str {
    let name = name.trim_end_matches('.');
    let labels: Vec<&str> = name.rsplitn(4, '.').collect();
    let keep = match labels.as_slice() {
        [tld, second, ..]
            if tld.len() == 2 && ["co", "com", "org", "net", "gov", "ac", "edu"].contains(second) =>
        {
            3
        }
        _ => 2,
    };
    let cut: usize = labels.iter().take(keep).map(|l| l.len() + 1).sum::<usize>();
    &name[name.len().saturating_sub(cut.saturating_sub(1))..]
}

/// Shannon entropy in bits per character.
pub fn entropy(text: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in text.bytes() {
        counts[b as usize] += 1;
    }
    let n = text.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

impl DnsTunnel {
    pub fn new(config: DnsTunnelConfig) -> Self {
        Self {
            config,
            domains: HashMap::new(),
        }
    }

    /// One query for `name` by pod `pod`; an alert the first time its base domain looks
    /// like a tunnel in the pod's current window.
    pub fn observe(&mut self, pod: u64, name: &str, now: Instant) -> Option<TunnelAlert> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let base = base_domain(&name).to_string();
        let sub = name[..name.len() - base.len()].trim_end_matches('.');
        let window = self.config.window;
        let key = (pod, base.clone());
        if !self.domains.contains_key(&key) && self.domains.len() >= MAX_DOMAINS {
            self.domains.retain(|_, w| now.duration_since(w.opened) < window);
            if self.domains.len() >= MAX_DOMAINS {
                return None;
            }
        }
        let w = self.domains.entry(key).or_insert_with(|| DomainWindow {
            opened: now,
            subdomains: HashSet::new(),
            raised: false,
        });
        if now.duration_since(w.opened) >= window {
            *w = DomainWindow {
                opened: now,
                subdomains: HashSet::new(),
                raised: false,
            };
        }
        if w.raised {
            return None;
        }
        let longest = sub.split('.').map(str::len).max().unwrap_or(0);
        let compact: String = sub.chars().filter(|c| *c != '.').collect();
        let sign = if longest > self.config.max_label {
            Some(TunnelSign::LongLabel { length: longest })
        } else if compact.len() >= self.config.entropy_min_len
            && entropy(&compact) >= self.config.entropy_bits
        {
            Some(TunnelSign::HighEntropy {
                bits_per_char: (entropy(&compact) * 100.0).round() / 100.0,
                length: compact.len(),
            })
        } else {
            if !sub.is_empty() && w.subdomains.len() <= self.config.distinct_limit {
                let mut h = DefaultHasher::new();
                sub.hash(&mut h);
                w.subdomains.insert(h.finish());
            }
            (w.subdomains.len() > self.config.distinct_limit).then_some(TunnelSign::ManySubdomains {
                distinct: w.subdomains.len(),
            })
        };
        let sign = sign?;
        w.raised = true;
        Some(TunnelAlert { domain: base, sign })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_domains() {
        assert_eq!(base_domain("a.b.github.com"), "github.com");
        assert_eq!(base_domain("github.com."), "github.com");
        assert_eq!(base_domain("x.y.example.co.uk"), "example.co.uk");
        assert_eq!(base_domain("localhost"), "localhost");
    }

    #[test]
    fn a_normal_build_raises_nothing() {
        let mut d = DnsTunnel::new(DnsTunnelConfig::default());
        let t0 = Instant::now();
        let names = [
            "github.com",
            "objects.githubusercontent.com",
            "registry.npmjs.org",
            "pypi.org",
            "files.pythonhosted.org",
            "d1a2b3c4d5e6f7.cloudfront.net",
            "production.cloudflare.docker.com",
            "auth.docker.io",
            "index.crates.io",
            "static.crates.io",
        ];
        for round in 0..50 {
            for n in names {
                assert_eq!(d.observe(1, n, t0 + Duration::from_secs(round)), None, "{n}");
            }
        }
    }

    #[test]
    fn long_labels_high_entropy_and_many_subdomains_raise_once() {
        let t0 = Instant::now();
        let mut d = DnsTunnel::new(DnsTunnelConfig::default());
        let long = format!("{}.t.evil.example", "a".repeat(60));
        assert_eq!(
            d.observe(1, &long, t0).map(|a| a.sign),
            Some(TunnelSign::LongLabel { length: 60 })
        );
        assert_eq!(d.observe(1, &long, t0), None, "once per window");

        let mut d = DnsTunnel::new(DnsTunnelConfig::default());
        let alert = d
            .observe(1, "mzxw6ytboi2dkmrtgq3tqnzsgeydmobq.evil.example", t0)
            .unwrap();
        assert!(matches!(alert.sign, TunnelSign::HighEntropy { .. }), "{alert:?}");
        assert_eq!(alert.domain, "evil.example");

        let mut d = DnsTunnel::new(DnsTunnelConfig::default());
        for i in 0..100 {
            assert_eq!(d.observe(1, &format!("c{i}.evil.example"), t0), None);
        }
        assert_eq!(
            d.observe(1, "c100.evil.example", t0).map(|a| a.sign),
            Some(TunnelSign::ManySubdomains { distinct: 101 })
        );
        // Another pod's queries count for that pod only.
        let mut d = DnsTunnel::new(DnsTunnelConfig::default());
        for i in 0..100 {
            assert_eq!(d.observe(1, &format!("c{i}.evil.example"), t0), None);
            assert_eq!(d.observe(2, &format!("d{i}.evil.example"), t0), None);
        }
        assert!(d.observe(2, "d100.evil.example", t0).is_some());
        // The window closes: a fresh count.
        assert_eq!(
            d.observe(1, "c0.evil.example", t0 + Duration::from_secs(301)),
            None
        );
    }

    #[test]
    fn memory_stays_bounded() {
        let mut d = DnsTunnel::new(DnsTunnelConfig::default());
        let t0 = Instant::now();
        for i in 0..(MAX_DOMAINS * 3) {
            for j in 0..5 {
                d.observe(1, &format!("s{j}.d{i}.example"), t0);
            }
        }
        assert!(d.domains.len() <= MAX_DOMAINS);
        for i in 0..1000 {
            d.observe(1, &format!("x{i}.many.example"), t0 + Duration::from_secs(400));
        }
        assert!(d.domains.values().all(|w| w.subdomains.len() <= 101));
    }
}
