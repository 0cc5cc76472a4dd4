//! The per-job table of `pipeguard events --summary`: the agent's records of a finished
//! workload folded into one table per pod (destinations, names first; verdict; attempts;
//! processes; anomalies), for people and as Markdown (`--summary-markdown FILE`).
//!
//! The agent reports refused and audited attempts and anomalies, not allowed traffic: the
//! table says so instead of showing zeros (allowed bytes are in its metrics; `exec`'s own
//! summary has them).

use std::collections::BTreeMap;

use super::record::{CiContext, Kind, Record};
use crate::{escape::printable, learn::markdown::cell};

/// Processes remembered per row, and rows and anomalies per job (a flood of distinct
/// destinations must not grow the follower without bound; the rest are counted).
const MAX_PROCESSES: usize = 8;
const MAX_ROWS: usize = 1_000;
const MAX_ANOMALIES: usize = 100;

/// One destination (or DNS question) of one job, with one verdict.
#[derive(Debug, Default)]
struct Row {
    attempts: u64,
    processes: Vec<String>,
}

/// (whether it has a name: named first, what, verdict).
type RowKey = (bool, String, String);

#[derive(Debug, Default)]
struct Job {
    ci: Option<CiContext>,
    rows: BTreeMap<RowKey, Row>,
    /// Attempts of rows past `MAX_ROWS`.
    other_attempts: u64,
    anomalies: Vec<String>,
    lost: u64,
}

/// Jobs by pod (`namespace/name`, or `cgroup N` for a cgroup not matched to a pod).
#[derive(Debug, Default)]
pub struct JobTables {
    jobs: BTreeMap<String, Job>,
    /// Kernel events lost on the node while the records were read.
    lost: u64,
}

impl JobTables {
    /// Adds one record. `pod`: only records of the pod with this name.
    pub fn add(&mut self, r: &Record, pod: Option<&str>) {
        if r.kind == Kind::Drops {
            self.lost += r.count;
            return;
        }
        if pod.is_some_and(|p| r.pod.as_ref().map(|x| x.name.as_str()) != Some(p)) {
            return;
        }
        let key = r
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_else(|| format!("cgroup {}", r.cgroup_id));
        let job = self.jobs.entry(key).or_default();
        if job.ci.is_none() {
            job.ci = r.ci.clone();
        }
        if r.kind == Kind::Anomaly {
            if job.anomalies.len() < MAX_ANOMALIES {
                job.anomalies.push(format!(
                    "{}: {}",
                    r.signal.as_deref().unwrap_or_default(),
                    r.reason.as_deref().unwrap_or_default()
                ));
            } else {
                job.lost += 1;
            }
            return;
        }
        let named = r.dst_name.is_some() || r.is_dns_query();
        let what = r.target_text().unwrap_or_else(|| "a raw or packet socket".into());
        let verdict = r.verdict.clone().unwrap_or_default();
        let row_key = (!named, what, verdict);
        if !job.rows.contains_key(&row_key) && job.rows.len() >= MAX_ROWS {
            job.other_attempts += r.count;
            return;
        }
        let row = job.rows.entry(row_key).or_default();
        row.attempts += r.count;
        if let Some(comm) = &r.comm
            && row.processes.len() < MAX_PROCESSES
            && !row.processes.contains(comm)
        {
            row.processes.push(comm.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// For a terminal: one block per job. Job-controlled text is escaped.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (pod, job) in &self.jobs {
            out.push_str(&format!("pipeguard: {}{}\n", printable(pod), ci_text(&job.ci)));
            for ((_, what, verdict), row) in &job.rows {
                out.push_str(&format!(
                    "  {:<8} {what} ×{} by {}\n",
                    verdict_word(verdict),
                    row.attempts,
                    printable(&row.processes.join(", "))
                ));
            }
            if job.other_attempts > 0 {
                out.push_str(&format!(
                    "  ... and {} attempts to other destinations\n",
                    job.other_attempts
                ));
            }
            for a in &job.anomalies {
                out.push_str(&format!("  ANOMALY  {}\n", printable(a)));
            }
            if job.rows.is_empty() && job.anomalies.is_empty() {
                out.push_str("  nothing refused, audited or unusual\n");
            }
        }
        out.push_str(&self.footer());
        out
    }

    /// One Markdown table per job, names first.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for (pod, job) in &self.jobs {
            out.push_str(&format!(
                "### pipeguard egress: `{}`{}\n\n",
                cell(pod),
                cell(&ci_text(&job.ci))
            ));
            let refused: u64 = job.rows.values().map(|r| r.attempts).sum::<u64>() + job.other_attempts;
            out.push_str(&format!(
                "{} destinations · {refused} attempts not allowed by the policy · {} anomalies\n\n",
                job.rows.len(),
                job.anomalies.len()
            ));
            if !job.rows.is_empty() {
                out.push_str("| Destination | Verdict | Attempts | Processes |\n");
                out.push_str("|---|---|---:|---|\n");
                for ((_, what, verdict), row) in &job.rows {
                    out.push_str(&format!(
                        "| {} | {} | {} | {} |\n",
                        cell(what),
                        markdown_verdict(verdict),
                        row.attempts,
                        cell(&row.processes.join(", "))
                    ));
                }
                if job.other_attempts > 0 {
                    out.push_str(&format!(
                        "| (other destinations) | | {} | |\n",
                        job.other_attempts
                    ));
                }
            }
            if !job.anomalies.is_empty() {
                out.push_str("\n**Anomalies**\n\n");
                for a in &job.anomalies {
                    out.push_str(&format!("- {}\n", cell(a)));
                }
            }
            out.push('\n');
        }
        out.push_str(&self.footer());
        out
    }

    fn footer(&self) -> String {
        let mut out = String::from(
            "From the agent's records: refused and audited attempts and anomalies; allowed traffic and bytes are in its metrics.\n",
        );
        let lost = self.lost + self.jobs.values().map(|j| j.lost).sum::<u64>();
        if lost > 0 {
            out.push_str(&format!(
                "{lost} events were lost or left out (see the records).\n"
            ));
        }
        out
    }
}

fn ci_text(ci: &Option<CiContext>) -> String {
    ci.as_ref()
        .map(|c| {
            let fields: Vec<String> = c.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            printable(&format!(" [{} {}]", c.system, fields.join(" "))).into_owned()
        })
        .unwrap_or_default()
}

fn verdict_word(verdict: &str) -> &'static str {
    match verdict {
        "audit" => "AUDIT",
        _ => "DENIED",
    }
}

fn markdown_verdict(verdict: &str) -> &'static str {
    match verdict {
        "audit" => "**would be denied** (audit)",
        _ => "**DENIED**",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::record::PodRef;

    fn record(pod: &str, port: u16, comm: &str, count: u64) -> Record {
        let mut r = Record::drops("t".into(), count, "n".into(), None);
        r.kind = Kind::Violation;
        r.verdict = Some("deny".into());
        r.hook = Some("connect4".into());
        r.protocol = Some("tcp".into());
        r.dst_ip = Some("127.0.0.1".parse().unwrap());
        r.dst_port = Some(port);
        r.comm = Some(comm.into());
        r.pod = Some(PodRef {
            namespace: "ci".into(),
            name: pod.into(),
            uid: "u".into(),
            container: None,
        });
        r
    }

    #[test]
    fn one_table_per_job_names_first_counts_folded() {
        let mut t = JobTables::default();
        t.add(&record("runner-a", 9, "curl", 3), None);
        t.add(&record("runner-a", 9, "wget", 2), None);
        let mut named = record("runner-a", 443, "git", 1);
        named.dst_name = Some("evil.example".into());
        t.add(&named, None);
        let mut query = record("runner-a", 53, "curl", 1);
        query.hook = Some("dns".into());
        query.query = Some("exfil|x.test".into());
        query.qtype = Some("A".into());
        t.add(&query, None);
        let mut anomaly = record("runner-a", 9, "curl", 21);
        anomaly.kind = Kind::Anomaly;
        anomaly.signal = Some("deny_burst".into());
        anomaly.reason = Some("more than 20".into());
        t.add(&anomaly, None);
        t.add(&record("runner-b", 9, "x", 1), Some("runner-a"));
        t.add(&Record::drops("t".into(), 4, "n".into(), None), None);

        let md = t.markdown();
        assert_eq!(md.matches("### pipeguard egress").count(), 1, "{md}");
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 4, "{md}");
        assert!(rows[1].contains("127.0.0.1:443/tcp (evil.example)"), "{md}");
        assert!(rows[2].contains("DNS query refused: exfil\\|x.test (A)"), "{md}");
        assert!(
            rows[3].starts_with("| 127.0.0.1:9/tcp | **DENIED** | 5 | curl, wget |"),
            "{md}"
        );
        assert!(md.contains("- deny_burst: more than 20"), "{md}");
        assert!(md.contains("4 events were lost"), "{md}");
        let text = t.text();
        assert!(
            text.contains("DENIED   127.0.0.1:9/tcp ×5 by curl, wget"),
            "{text}"
        );
        assert!(!text.contains("runner-b"), "{text}");
    }
}
