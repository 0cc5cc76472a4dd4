//! Anomaly signals: pure, bounded-memory detectors fed one record at a time, and the
//! `"kind":"anomaly"` event they produce. Each signal can be switched off or tuned with
//! `--anomaly SIGNAL=off|on|SETTING` (exec and agent).

pub mod deny_burst;
pub mod dns_tunnel;
pub mod new_destination;
pub mod upload_volume;

use std::{net::IpAddr, time::Instant};

use serde::{Deserialize, Serialize};

pub use self::{
    deny_burst::{DenyBurst, DenyBurstConfig},
    dns_tunnel::{DnsTunnel, DnsTunnelConfig},
    new_destination::{Baseline, Dest, NewDestination},
    upload_volume::UploadVolume,
};
use crate::engine::events::Violation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    DenyBurst,
    UploadVolume,
    NewDestination,
    DnsTunnel,
}

impl Signal {
    pub const ALL: [Self; 4] = [
        Self::DenyBurst,
        Self::UploadVolume,
        Self::NewDestination,
        Self::DnsTunnel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::DenyBurst => "deny_burst",
            Self::UploadVolume => "upload_volume",
            Self::NewDestination => "new_destination",
            Self::DnsTunnel => "dns_tunnel",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Which signals are on, with their thresholds. Default: all on, with the defaults of each
/// detector (`new_destination` also needs a baseline to compare with).
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyConfig {
    pub deny_burst: Option<DenyBurstConfig>,
    /// Bytes to one destination.
    pub upload_volume: Option<u64>,
    pub new_destination: bool,
    pub dns_tunnel: Option<DnsTunnelConfig>,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            deny_burst: Some(DenyBurstConfig::default()),
            upload_volume: Some(upload_volume::DEFAULT_BYTES),
            new_destination: true,
            dns_tunnel: Some(DnsTunnelConfig::default()),
        }
    }
}

/// One `--anomaly` argument.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting(Signal, Option<String>);

/// `SIGNAL=off`, `SIGNAL=on`, `deny_burst=COUNT/DURATION` (e.g. 20/10s),
/// `upload_volume=SIZE` (e.g. 100MiB).
pub fn parse_setting(s: &str) -> Result<Setting, String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected SIGNAL=off|on|SETTING, got {s:?}"))?;
    let signal = Signal::ALL
        .into_iter()
        .find(|sig| sig.name() == name)
        .ok_or_else(|| {
            format!(
                "unknown signal {name:?}: use {}",
                Signal::ALL.map(Signal::name).join(", ")
            )
        })?;
    let setting = match value {
        "off" => Setting(signal, None),
        "on" => Setting(signal, Some(String::new())),
        v => Setting(signal, Some(v.to_string())),
    };
    // Validate now, so a typo fails at the command line.
    AnomalyConfig::default().apply(&setting)?;
    Ok(setting)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("not a size: {s:?} (e.g. 100MiB)"))?;
    let factor: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(format!("unknown unit in {s:?}: use B, KiB, MiB or GiB")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("{s:?} is too large"))
}

impl AnomalyConfig {
    pub fn from_settings(settings: &[Setting]) -> Self {
        let mut config = Self::default();
        for s in settings {
            // Validated by parse_setting.
            let _ = config.apply(s);
        }
        config
    }

    fn apply(&mut self, Setting(signal, value): &Setting) -> Result<(), String> {
        let value = value.as_deref();
        match signal {
            Signal::DenyBurst => {
                self.deny_burst = match value {
                    None => None,
                    Some("") => Some(DenyBurstConfig::default()),
                    Some(v) => {
                        let (count, window) = v
                            .split_once('/')
                            .ok_or_else(|| format!("deny_burst={v}: expected COUNT/DURATION, e.g. 20/10s"))?;
                        Some(DenyBurstConfig {
                            limit: count.parse().map_err(|_| format!("deny_burst={v}: bad count"))?,
                            window: humantime::parse_duration(window)
                                .map_err(|e| format!("deny_burst={v}: {e}"))?,
                        })
                    }
                }
            }
            Signal::UploadVolume => {
                self.upload_volume = match value {
                    None => None,
                    Some("") => Some(upload_volume::DEFAULT_BYTES),
                    Some(v) => Some(parse_size(v).map_err(|e| format!("upload_volume: {e}"))?),
                }
            }
            Signal::NewDestination => match value {
                None => self.new_destination = false,
                Some("") => self.new_destination = true,
                Some(v) => return Err(format!("new_destination={v}: use on or off")),
            },
            Signal::DnsTunnel => match value {
                None => self.dns_tunnel = None,
                Some("") => self.dns_tunnel = Some(DnsTunnelConfig::default()),
                Some(v) => return Err(format!("dns_tunnel={v}: use on or off")),
            },
        }
        Ok(())
    }
}

/// An anomaly as exec prints it (a JSON line next to the violations); the agent carries the
/// same facts in its `Record` (`kind: anomaly`, `signal`, `reason`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Always `anomaly`.
    pub kind: String,
    /// deny_burst, upload_volume, new_destination or dns_tunnel.
    pub signal: String,
    /// RFC 3339.
    pub time: String,
    pub detail: String,
    /// What the signal counted (denials, bytes, queries, attempts).
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The domain, for dns_tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    pub pod_cgroup_id: u64,
}

impl Anomaly {
    pub(crate) fn new(signal: Signal, detail: String, count: u64, pod_cgroup_id: u64) -> Self {
        Self {
            kind: "anomaly".into(),
            signal: signal.name().into(),
            time: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            detail,
            count,
            dst_ip: None,
            dst_port: None,
            protocol: None,
            domain: None,
            comm: None,
            pod_cgroup_id,
        }
    }

    pub(crate) fn to(mut self, (ip, port, protocol): &Dest) -> Self {
        self.dst_ip = Some(*ip);
        self.dst_port = Some(*port);
        self.protocol = Some(protocol.clone());
        self
    }

    /// `signal: detail`, for summaries.
    pub fn line(&self) -> String {
        format!("{}: {}", self.signal, self.detail)
    }
}

/// Every enabled detector; a stage of the event pipeline. O(1) per record.
pub struct Detectors {
    deny_burst: Option<DenyBurst>,
    upload_volume: Option<(u64, UploadVolume<Dest>)>,
    new_destination: Option<NewDestination>,
    dns_tunnel: Option<DnsTunnel>,
    deny_burst_config: DenyBurstConfig,
}

impl Detectors {
    /// `baseline` is what `new_destination` compares with; without one it stays off.
    pub fn new(config: &AnomalyConfig, baseline: Option<Baseline>) -> Self {
        Self {
            deny_burst: config.deny_burst.map(DenyBurst::new),
            upload_volume: config.upload_volume.map(|t| (t, UploadVolume::new(t))),
            new_destination: baseline
                .filter(|_| config.new_destination)
                .map(NewDestination::new),
            dns_tunnel: config.dns_tunnel.map(DnsTunnel::new),
            deny_burst_config: config.deny_burst.unwrap_or_default(),
        }
    }

    /// Whether allowed attempts must be reported for the detectors (new_destination).
    pub fn wants_allowed(&self) -> bool {
        self.new_destination.is_some()
    }

    /// Whether the kernel must report the queries it lets out (dns_tunnel).
    pub fn wants_query_reports(&self) -> bool {
        self.dns_tunnel.is_some()
    }

    /// One decoded attempt (`count` identical ones when aggregated).
    pub fn on_attempt(&mut self, v: &Violation, count: u64, now: Instant) -> Vec<Anomaly> {
        let mut out = Vec::new();
        let dest = match (v.dst_ip, v.dst_port) {
            (Some(ip), Some(port)) => Some((crate::policy::canonical(ip), port, v.protocol.clone())),
            _ => None,
        };
        // Audited attempts are would-be denials: a scan in audit mode is still a scan.
        if v.verdict != "allow"
            && let Some(d) = &mut self.deny_burst
            && let Some(n) = d.observe(v.pod_cgroup_id, count, now)
        {
            let DenyBurstConfig { limit, window } = self.deny_burst_config;
            let mut a = Anomaly::new(
                Signal::DenyBurst,
                format!(
                    "more than {limit} denied attempts within {} (last: {} to {})",
                    humantime::format_duration(window),
                    v.comm,
                    dest.as_ref()
                        .map(|(ip, port, p)| format!("{ip}:{port}/{p}"))
                        .unwrap_or_else(|| v.hook.to_string())
                ),
                n,
                v.pod_cgroup_id,
            );
            a.comm = Some(v.comm.clone());
            out.push(a);
        }
        if v.verdict != "deny"
            && let (Some(d), Some(dest)) = (&mut self.new_destination, &dest)
            && d.observe(dest)
        {
            let mut a = Anomaly::new(
                Signal::NewDestination,
                format!(
                    "{} sent to {}:{}/{}, which the baseline does not have",
                    v.comm, dest.0, dest.1, dest.2
                ),
                count,
                v.pod_cgroup_id,
            )
            .to(dest);
            a.comm = Some(v.comm.clone());
            out.push(a);
        }
        // The queries the kernel reports: those no domain rule allows (refused, or audited),
        // and those it lets out unjudged by name (verdict allow, see `on_allowed_query`).
        if v.hook == "dns"
            && let Some(name) = &v.query
            && let Some(mut a) = self.on_query(v.pod_cgroup_id, name, now)
        {
            a.comm = Some(v.comm.clone());
            out.push(a);
        }
        out
    }

    /// `total` bytes sent to `dest` so far by pod `pod_cgroup_id`.
    pub fn on_bytes(&mut self, pod_cgroup_id: u64, dest: &Dest, total: u64) -> Option<Anomaly> {
        let (threshold, detector) = self.upload_volume.as_mut()?;
        detector.observe(dest, total).then(|| {
            Anomaly::new(
                Signal::UploadVolume,
                format!(
                    "{total} bytes sent to {}:{}/{}, above the {} threshold",
                    dest.0,
                    dest.1,
                    dest.2,
                    crate::learn::render::human_bytes(*threshold)
                ),
                total,
                pod_cgroup_id,
            )
            .to(dest)
        })
    }

    /// An allowed attempt the agent's stream does not carry: only the DNS queries the
    /// kernel reports for dns_tunnel (`EngineConfig::report_queries`) count.
    pub fn on_allowed_query(&mut self, v: &Violation, now: Instant) -> Option<Anomaly> {
        if v.hook != "dns" || v.verdict != "allow" {
            return None;
        }
        let mut a = self.on_query(v.pod_cgroup_id, v.query.as_deref()?, now)?;
        a.comm = Some(v.comm.clone());
        Some(a)
    }

    /// One DNS query for `name`.
    pub fn on_query(&mut self, pod_cgroup_id: u64, name: &str, now: Instant) -> Option<Anomaly> {
        let alert = self.dns_tunnel.as_mut()?.observe(pod_cgroup_id, name, now)?;
        let (detail, count) = match alert.sign {
            dns_tunnel::TunnelSign::LongLabel { length } => {
                (format!("a {length}-character label under {}", alert.domain), 1)
            }
            dns_tunnel::TunnelSign::HighEntropy {
                bits_per_char,
                length,
            } => (
                format!(
                    "a {length}-character subdomain of {} with {bits_per_char} bits of entropy per character",
                    alert.domain
                ),
                1,
            ),
            dns_tunnel::TunnelSign::ManySubdomains { distinct } => (
                format!("{distinct} distinct subdomains of {} in one window", alert.domain),
                distinct as u64,
            ),
        };
        let mut a = Anomaly::new(Signal::DnsTunnel, detail, count, pod_cgroup_id);
        a.domain = Some(alert.domain);
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_switch_and_tune_each_signal() {
        let config = AnomalyConfig::from_settings(&[
            parse_setting("deny_burst=5/2s").unwrap(),
            parse_setting("upload_volume=1MiB").unwrap(),
            parse_setting("new_destination=off").unwrap(),
            parse_setting("dns_tunnel=off").unwrap(),
        ]);
        assert_eq!(
            config.deny_burst,
            Some(DenyBurstConfig {
                limit: 5,
                window: std::time::Duration::from_secs(2)
            })
        );
        assert_eq!(config.upload_volume, Some(1 << 20));
        assert!(!config.new_destination && config.dns_tunnel.is_none());
        assert_eq!(
            AnomalyConfig::from_settings(&[parse_setting("deny_burst=off").unwrap()]).deny_burst,
            None
        );
        for bad in [
            "deny_burst",
            "burst=off",
            "deny_burst=20",
            "upload_volume=3 parsecs",
            "dns_tunnel=7",
        ] {
            assert!(parse_setting(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn detectors_turn_records_into_anomaly_events() {
        let v = |verdict: &'static str, port: u16| Violation {
            time: "t".into(),
            verdict,
            hook: "connect4",
            direction: "egress",
            protocol: "tcp".into(),
            dst_ip: Some("10.0.0.1".parse().unwrap()),
            dst_port: Some(port),
            src_ip: None,
            src_port: None,
            pid: 1,
            comm: "nmap".into(),
            cgroup_id: 1,
            pod_cgroup_id: 9,
            policy_id: 1,
            socket: None,
            dst_name: None,
            query: None,
            qtype: None,
            malformed: false,
            name_hash: 0,
        };
        let baseline = Baseline::Seen(std::collections::HashSet::from([(
            "10.0.0.1".parse().unwrap(),
            443,
            "tcp".to_string(),
        )]));
        let mut d = Detectors::new(&AnomalyConfig::default(), Some(baseline));
        let now = Instant::now();
        let mut found = Vec::new();
        for port in 0..25 {
            found.extend(d.on_attempt(&v("deny", port), 1, now));
        }
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].signal.as_str(), found[0].count), ("deny_burst", 21));
        let json = serde_json::to_value(&found[0]).unwrap();
        assert_eq!(json["kind"], "anomaly");
        assert!(d.on_attempt(&v("allow", 443), 1, now).is_empty());
        let new = d.on_attempt(&v("allow", 8443), 1, now);
        assert_eq!(new[0].signal, "new_destination");
        assert_eq!(new[0].dst_port, Some(8443));
        let dest = ("10.0.0.1".parse().unwrap(), 443, "tcp".to_string());
        assert!(d.on_bytes(9, &dest, 1 << 20).is_none());
        assert_eq!(d.on_bytes(9, &dest, 200 << 20).unwrap().signal, "upload_volume");
        assert!(d.on_query(9, "github.com", now).is_none());
        // A refused query of the kernel's, fed through on_attempt like every event.
        let query = Violation {
            hook: "dns",
            query: Some(format!("{}.t.example", "z".repeat(55))),
            ..v("deny", 53)
        };
        let tunnel = d.on_attempt(&query, 1, now);
        assert_eq!(
            (tunnel[0].signal.as_str(), tunnel[0].domain.as_deref()),
            ("dns_tunnel", Some("t.example"))
        );
        assert_eq!(
            d.on_query(9, &format!("{}.x.example", "q".repeat(60)), now)
                .unwrap()
                .signal,
            "dns_tunnel"
        );
        let mut off = Detectors::new(
            &AnomalyConfig::from_settings(&[parse_setting("deny_burst=off").unwrap()]),
            None,
        );
        for port in 0..25 {
            assert!(off.on_attempt(&v("deny", port), 1, now).is_empty());
        }
        assert!(!off.wants_allowed());
    }
}
