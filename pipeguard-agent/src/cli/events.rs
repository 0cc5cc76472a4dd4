//! `pipeguard events`: follow the agent's violation stream and print it readably.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    escape::printable,
    events::{
        client::{Request, follow},
        record::{Kind, Record},
    },
};

/// Follow the violation stream of an agent.
///
/// Example: pipeguard events --endpoint http://127.0.0.1:9440 --token-file /var/run/pipeguard/token --namespace ci
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// The agent's HTTP listener.
    #[arg(long, env = "PIPEGUARD_ENDPOINT", default_value = "http://127.0.0.1:9440")]
    pub endpoint: String,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Only records of pods in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print the records as JSON lines, unchanged.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EventsArgs) -> ExitCode {
    let token = match &args.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_string()),
            Err(error) => {
                eprintln!("pipeguard events: --token-file {}: {error}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("pipeguard events: {error}");
            return ExitCode::FAILURE;
        }
    };
    let req = Request {
        endpoint: &args.endpoint,
        token: token.as_deref(),
        namespace: args.namespace.as_deref(),
        sse: false,
    };
    let result = runtime.block_on(follow(&req, |line| {
        if args.json {
            println!("{line}");
        } else {
            match serde_json::from_str::<Record>(line) {
                Ok(record) => println!("{}", human(&record)),
                Err(_) => println!("{line}"),
            }
        }
        true
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pipeguard events: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One line a person can read at a glance. Every field a job or a cluster user controls
/// goes through [`printable`], so a record is always exactly one honest line.
pub fn human(r: &Record) -> String {
    let text = |s: &Option<String>| printable(s.as_deref().unwrap_or_default()).into_owned();
    if r.kind == Kind::Drops {
        return format!(
            "{} LOST   {} kernel events on {} ({})",
            printable(&r.time),
            r.count,
            printable(&r.node),
            text(&r.reason)
        );
    }
    if r.kind == Kind::Anomaly {
        let pod = r
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", printable(&p.namespace), printable(&p.name)))
            .unwrap_or_else(|| format!("cgroup {}", r.cgroup_id));
        return format!(
            "{} ANOMALY {} {pod}: {}",
            printable(&r.time),
            text(&r.signal),
            text(&r.reason)
        );
    }
    let verdict = if r.verdict.as_deref() == Some("audit") {
        "AUDIT "
    } else {
        "DENIED"
    };
    let pod = r
        .pod
        .as_ref()
        .map(|p| format!("{}/{}", printable(&p.namespace), printable(&p.name)))
        .unwrap_or_else(|| format!("cgroup {}", r.cgroup_id));
    let process = format!("{}[{}]", text(&r.comm), r.pid.unwrap_or_default());
    let target = match r.target_text() {
        Some(t) if r.is_dns_query() => t,
        Some(dest) => format!("→ {dest}"),
        None => "→ a raw or packet socket".to_string(),
    };
    let count = if r.count > 1 {
        format!(" ×{}", r.count)
    } else {
        String::new()
    };
    let ci =
        r.ci.as_ref()
            .map(|c| {
                format!(
                    " [{} {}]",
                    printable(&c.system),
                    c.fields
                        .iter()
                        .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
            .unwrap_or_default();
    format!(
        "{} {verdict} {pod} {process} {target} via {}{count}{ci}: {}",
        printable(&r.time),
        text(&r.hook),
        text(&r.reason)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::record::PodRef;

    #[test]
    fn a_hostile_process_name_cannot_hide_or_forge_a_line() {
        let record = sample();
        let line = human(&record);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(
            line.starts_with("2026-01-01T00:00:00Z DENIED ci/r\\nforged"),
            "{line}"
        );
        assert!(line.contains("\\u{1b}[2K\\r"), "{line}");
    }

    #[test]
    fn learned_names_follow_the_address_and_dns_queries_read_as_queries() {
        let mut named = sample();
        named.dst_ip = Some("203.0.113.7".parse().unwrap());
        named.dst_port = Some(443);
        named.dst_name = Some("exfil.example.net\n".into());
        let line = human(&named);
        assert!(
            line.contains("→ 203.0.113.7:443/tcp (exfil.example.net\\n) via connect4"),
            "{line}"
        );

        let mut query = sample();
        query.hook = Some("dns".into());
        query.protocol = Some("udp".into());
        query.dst_ip = Some("10.96.0.10".parse().unwrap());
        query.dst_port = Some(53);
        query.query = Some("secret.exfil.test".into());
        query.qtype = Some("A".into());
        let line = human(&query);
        assert!(
            line.contains("DNS query refused: secret.exfil.test (A) → 10.96.0.10:53 via dns"),
            "{line}"
        );
        query.verdict = Some("audit".into());
        assert!(human(&query).contains("DNS query would be refused: secret.exfil.test (A)"));
        query.malformed = true;
        query.query = None;
        assert!(human(&query).contains("(malformed query) → 10.96.0.10:53"));
        let json = serde_json::to_string(&query).unwrap();
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back, query, "the new fields round-trip");
    }

    fn sample() -> Record {
        Record {
            kind: Kind::Violation,
            signal: None,
            time: "2026-01-01T00:00:00Z".into(),
            first_seen: "t".into(),
            last_seen: "t".into(),
            count: 1,
            verdict: Some("deny".into()),
            hook: Some("connect4".into()),
            protocol: Some("tcp".into()),
            dst_ip: Some("127.0.0.1".parse().unwrap()),
            dst_port: Some(9),
            dst_name: None,
            query: None,
            qtype: None,
            malformed: false,
            pid: Some(7),
            comm: Some("\x1b[2K\r\x1b[8mx\nOK: all clear".into()),
            exe: Some("/tmp/\x1b]0;t\x07".into()),
            node: "n".into(),
            pod: Some(PodRef {
                namespace: "ci".into(),
                name: "r\nforged".into(),
                uid: "u".into(),
                container: None,
            }),
            policies: vec![],
            reason: Some("why".into()),
            ci: None,
            cgroup_id: 1,
        }
    }
}
