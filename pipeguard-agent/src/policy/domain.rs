//! Domain allow rules (`DomainPolicy`, `ClusterDomainPolicy`), compiled: the contract
//! between the policy layer (which parses and selects them) and the engine (which turns
//! them into the kernel's name map). Also the name syntax itself: what a rule may say.

use std::fmt;

use super::Ports;

/// A name a rule allows, normalized: lowercase ASCII (IDN names in punycode), no trailing
/// dot, every label 1..=63 bytes, at most 253 bytes in all.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainPattern {
    /// `github.com`: that name only.
    Exact(String),
    /// `*.npmjs.org`, stored as `npmjs.org`: one or more labels before the suffix, never
    /// the suffix itself.
    Wildcard(String),
}

/// One domain rule of one policy: the names it allows, and on which ports the addresses
/// they resolve to may be reached (`Ports::All` when the rule names no ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRule {
    pub pattern: DomainPattern,
    pub ports: Ports,
}

/// The longest name DNS can carry (RFC 1035: 255 octets on the wire, 253 as text).
pub const MAX_NAME_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;

impl DomainPattern {
    /// Parses a rule's name: `github.com`, `GitHub.com.` (same), `*.githubusercontent.com`.
    /// The error says what is wrong in words a user can act on.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.is_ascii() {
            return Err(match punycode_form(text) {
                Some(ascii) => {
                    format!("{text:?} is not ASCII: write internationalized names in punycode ({ascii:?})")
                }
                None => format!("{text:?} is not ASCII: write internationalized names in punycode"),
            });
        }
        let lower = text.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() {
            return Err("empty name".into());
        }
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "{text:?} is an IP address, not a name: allow it with a NetworkPolicy ipBlock"
            ));
        }
        let (wildcard, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None if name == "*" => {
                return Err("\"*\" alone would allow every name; name a suffix (*.example.com)".into());
            }
            None => (false, name),
        };
        if rest.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard is only allowed as the whole first label (*.example.com)"
            ));
        }
        check_labels(text, rest)?;
        if wildcard && name.len() > MAX_NAME_LEN {
            return Err(format!("{text:?} is longer than {MAX_NAME_LEN} characters"));
        }
        Ok(if wildcard {
            Self::Wildcard(rest.to_string())
        } else {
            Self::Exact(rest.to_string())
        })
    }

    /// Whether `name` (a query name or one a user asks about) is allowed by this pattern.
    /// Case and a trailing dot do not matter.
    pub fn matches(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        match self {
            Self::Exact(exact) => name == exact,
            Self::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Letters, digits, `-` (not first or last) and `_` (service labels such as `_acme`).
fn check_labels(text: &str, name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!("{text:?} is longer than {MAX_NAME_LEN} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("{text:?} has an empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "{text:?}: label {label:?} is longer than {MAX_LABEL_LEN} characters"
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{text:?}: {bad:?} is not allowed in a name (letters, digits, '-', '_')"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{text:?}: label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Public DNS-over-HTTPS resolvers: a rule that allows one of these names lets a job
/// resolve any name over HTTPS, past the DNS filter. Warned about at load time.
pub const DOH_RESOLVERS: &[&str] = &[
    "dns.google",
    "dns.google.com",
    "cloudflare-dns.com",
    "mozilla.cloudflare-dns.com",
    "one.one.one.one",
    "1dot1dot1dot1.cloudflare-dns.com",
    "dns.quad9.net",
    "dns9.quad9.net",
    "dns10.quad9.net",
    "dns11.quad9.net",
    "doh.opendns.com",
    "dns.adguard-dns.com",
    "dns.nextdns.io",
    "doh.cleanbrowsing.org",
    "doh.mullvad.net",
];

/// The known DoH resolvers `pattern` allows.
pub fn doh_resolvers_allowed(pattern: &DomainPattern) -> Vec<&'static str> {
    DOH_RESOLVERS
        .iter()
        .copied()
        .filter(|name| pattern.matches(name))
        .collect()
}

/// The punycode (`xn--`) form of a Unicode name, label by label, after lowercasing. Full
/// IDNA mapping (UTS #46) does more; this is a suggestion in an error message, and the
/// user's registrar has the authoritative form.
fn punycode_form(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let labels: Option<Vec<String>> = lower
        .trim_end_matches('.')
        .split('.')
        .map(|label| {
            if label.is_ascii() {
                Some(label.to_string())
            } else {
                super::punycode::encode(label).map(|p| format!("xn--{p}"))
            }
        })
        .collect();
    labels.map(|l| l.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> DomainPattern {
        DomainPattern::Exact(s.into())
    }

    fn wild(s: &str) -> DomainPattern {
        DomainPattern::Wildcard(s.into())
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(DomainPattern::parse("github.com"), Ok(exact("github.com")));
        assert_eq!(DomainPattern::parse("GitHub.COM."), Ok(exact("github.com")));
        assert_eq!(
            DomainPattern::parse("*.GitHubUserContent.com"),
            Ok(wild("githubusercontent.com"))
        );
        assert_eq!(
            DomainPattern::parse("_acme-challenge.x.io"),
            Ok(exact("_acme-challenge.x.io"))
        );
        assert_eq!(
            DomainPattern::parse("xn--bcher-kva.example"),
            Ok(exact("xn--bcher-kva.example"))
        );
    }

    #[test]
    fn wildcards_match_one_or_more_labels_never_the_suffix() {
        let p = wild("npmjs.org");
        assert!(p.matches("registry.npmjs.org"));
        assert!(p.matches("a.b.npmjs.org"));
        assert!(p.matches("REGISTRY.npmjs.org."));
        assert!(!p.matches("npmjs.org"));
        assert!(!p.matches("evilnpmjs.org"));
        assert!(!p.matches("npmjs.org.evil.com"));
        assert!(!p.matches(".npmjs.org"));
        let e = exact("github.com");
        assert!(e.matches("GITHUB.com."));
        assert!(!e.matches("api.github.com"));
        assert!(!e.matches("github.com.evil"));
    }

    #[test]
    fn bad_names_say_why() {
        let cases = [
            ("", "empty name"),
            (".", "empty name"),
            ("*", "would allow every name"),
            ("a..b", "empty label"),
            ("github.com..", "empty label"),
            ("*.*.com", "only allowed as the whole first label"),
            ("foo*.com", "only allowed as the whole first label"),
            ("a.*.com", "only allowed as the whole first label"),
            ("*com", "only allowed as the whole first label"),
            ("git hub.com", "' ' is not allowed"),
            ("https://github.com", "':' is not allowed"),
            ("-a.com", "starts or ends with '-'"),
            ("a-.com", "starts or ends with '-'"),
            ("10.0.0.1", "is an IP address"),
            ("bücher.example", "punycode (\"xn--bcher-kva.example\")"),
            ("Bücher.example", "punycode (\"xn--bcher-kva.example\")"),
        ];
        for (text, message) in cases {
            let error = DomainPattern::parse(text).unwrap_err();
            assert!(error.contains(message), "{text:?}: {error}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(
            DomainPattern::parse(&long_label)
                .unwrap_err()
                .contains("longer than 63")
        );
        let ok_label = format!("{}.com", "a".repeat(63));
        assert!(DomainPattern::parse(&ok_label).is_ok());
        let long_name = vec!["a".repeat(63); 4].join("."); // 255
        assert!(
            DomainPattern::parse(&long_name)
                .unwrap_err()
                .contains("longer than 253")
        );
        let max_name = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "a".repeat(61)); // 253
        assert!(DomainPattern::parse(&max_name).is_ok());
        assert!(DomainPattern::parse(&format!("*.{max_name}")).is_err());
    }

    #[test]
    fn display_round_trips() {
        for text in ["github.com", "*.githubusercontent.com"] {
            assert_eq!(DomainPattern::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn doh_resolvers_are_found_through_wildcards() {
        assert_eq!(doh_resolvers_allowed(&exact("dns.google")), vec!["dns.google"]);
        assert_eq!(doh_resolvers_allowed(&wild("google")), vec!["dns.google"]);
        assert!(doh_resolvers_allowed(&wild("quad9.net")).len() >= 3);
        assert!(doh_resolvers_allowed(&exact("github.com")).is_empty());
    }
}
