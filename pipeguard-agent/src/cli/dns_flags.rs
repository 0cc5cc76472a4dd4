//! The DNS flags `agent`, `exec` and `check` share: `--cluster-domain`, `--dns-min-ttl`.

use std::time::Duration;

use pipeguard_common::MAX_TTL_S;

use crate::policy::DomainPattern;

/// `--cluster-domain`: a plain DNS name (`cluster.local`), lowercase, no trailing dot.
pub fn parse_cluster_domain(s: &str) -> Result<String, String> {
    match DomainPattern::parse(s)? {
        DomainPattern::Exact(name) => Ok(name),
        DomainPattern::Wildcard(_) => Err(format!(
            "{s:?} is a pattern: give the domain itself (every name under it is included)"
        )),
    }
}

/// `--dns-min-ttl`: seconds (`30`) or a duration (`30s`, `2m`), from 1 s to one day.
pub fn parse_dns_min_ttl(s: &str) -> Result<Duration, String> {
    let ttl = match s.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (30, 30s, 2m): {e}"))?
        }
    };
    let max = Duration::from_secs(u64::from(MAX_TTL_S));
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is under 1s: an address must outlive the answer long enough to connect to it"
        ));
    }
    if ttl > max {
        return Err(format!(
            "{s:?} is over one day ({}s), the longest TTL the kernel keeps",
            MAX_TTL_S
        ));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_domain_is_a_normalized_plain_name() {
        assert_eq!(parse_cluster_domain("Cluster.Local.").unwrap(), "cluster.local");
        assert!(
            parse_cluster_domain("*.cluster.local")
                .unwrap_err()
                .contains("pattern")
        );
        assert!(
            parse_cluster_domain("bad..name")
                .unwrap_err()
                .contains("empty label")
        );
        assert!(parse_cluster_domain("10.0.0.1").is_err());
        assert!(parse_cluster_domain("").is_err());
    }

    #[test]
    fn dns_min_ttl_takes_seconds_or_durations_within_bounds() {
        assert_eq!(parse_dns_min_ttl("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_dns_min_ttl("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_dns_min_ttl("1s").unwrap(), Duration::from_secs(1));
        assert!(parse_dns_min_ttl("0").unwrap_err().contains("under 1s"));
        assert!(parse_dns_min_ttl("500ms").unwrap_err().contains("under 1s"));
        assert!(parse_dns_min_ttl("2d").unwrap_err().contains("over one day"));
        assert!(parse_dns_min_ttl("soon").unwrap_err().contains("not a duration"));
    }
}
