//! `pipeguard events`: follow the agent's violation stream and print it readably, or read a
//! finished workload's records and print one table per job (`--summary`).

use std::{
    io::{BufRead, Write},
    path::PathBuf,
    process::ExitCode,
};

use crate::{
    escape::printable,
    events::{
        client::{Request, follow},
        job_table::JobTables,
        record::{Kind, Record},
    },
};

/// Follow the violation stream of an agent, or summarize a workload's records.
///
/// Example: pipeguard events --endpoint http://127.0.0.1:9440 --token-file /var/run/pipeguard/token --namespace ci
/// Example: pipeguard events --from /var/log/pipeguard/events.jsonl --namespace ci --pod runner-x --summary-markdown "$GITHUB_STEP_SUMMARY"
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
    /// Only records of the pod with this name.
    #[arg(long)]
    pub pod: Option<String>,
    /// Read records from this file (the agent's --events-file, or saved --json output)
    /// instead of the agent, up to its end.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Print the records as JSON lines, unchanged.
    #[arg(long, conflicts_with = "summary")]
    pub json: bool,
    /// Instead of each record, one table per job (pod) at the end: at the end of --from,
    /// when the stream ends, or on Ctrl-C/SIGTERM.
    #[arg(long)]
    pub summary: bool,
    /// Also write the tables as Markdown, appended to FILE (e.g. $GITHUB_STEP_SUMMARY).
    /// Implies --summary.
    #[arg(long, value_name = "FILE")]
    pub summary_markdown: Option<PathBuf>,
}

pub fn run(args: EventsArgs) -> ExitCode {
    let summary = args.summary || args.summary_markdown.is_some();
    let mut tables = JobTables::default();
    // Lines that are not agent records (exec's events, say): said, not silently dropped.
    let mut not_records = 0u64;
    let mut on_line = |line: &str| {
        let record = serde_json::from_str::<Record>(line).ok();
        not_records += u64::from(record.is_none());
        if let Some(r) = &record
            && (!wanted(r, args.namespace.as_deref(), args.pod.as_deref()))
        {
            return true;
        }
        match (&record, summary) {
            (Some(r), true) => tables.add(r, args.pod.as_deref()),
            (_, true) => {}
            (Some(r), false) if !args.json => println!("{}", human(r)),
            _ => println!("{line}"),
        }
        true
    };
    let result = match &args.from {
        Some(path) => read_file(path, &mut on_line),
        None => follow_agent(&args, &mut on_line),
    };
    let mut code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pipeguard events: {error}");
            ExitCode::FAILURE
        }
    };
    if summary && not_records > 0 {
        eprintln!("pipeguard events: {not_records} lines were not agent records and are not in the tables");
    }
    if summary {
        // What was read before an error is still worth the table.
        print!("{}", tables.text());
        if let Some(path) = &args.summary_markdown
            && let Err(error) = append(path, &(tables.markdown() + "\n"))
        {
            eprintln!("pipeguard events: --summary-markdown {}: {error}", path.display());
            code = ExitCode::FAILURE;
        }
    }
    code
}

/// Whether a record passes --namespace and --pod (the agent filters the namespace of a
/// stream itself; a file is filtered here). Lost-event records concern every pod.
fn wanted(r: &Record, namespace: Option<&str>, pod: Option<&str>) -> bool {
    if r.kind == Kind::Drops {
        return true;
    }
    let of = r.pod.as_ref();
    namespace.is_none_or(|ns| of.is_some_and(|p| p.namespace == ns))
        && pod.is_none_or(|name| of.is_some_and(|p| p.name == name))
}

fn read_file(path: &PathBuf, on_line: &mut impl FnMut(&str) -> bool) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("--from {}: {e}", path.display()))?;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("--from {} line {}: {e}", path.display(), n + 1))?;
        if !line.trim().is_empty() && !on_line(&line) {
            break;
        }
    }
    Ok(())
}

/// Follows the agent's stream until it ends or Ctrl-C/SIGTERM.
fn follow_agent(args: &EventsArgs, on_line: &mut impl FnMut(&str) -> bool) -> Result<(), String> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let req = Request {
        endpoint: &args.endpoint,
        token: token.as_deref(),
        namespace: args.namespace.as_deref(),
        sse: false,
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            result = follow(&req, on_line) => result.map_err(|e| e.to_string()),
            _ = term.recv() => Ok(()),
            _ = int.recv() => Ok(()),
        }
    })
}

fn append(path: &PathBuf, text: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
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
            domain: None,
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
