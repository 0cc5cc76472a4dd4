//! The job summary as Markdown (`exec --summary-markdown FILE`), for `$GITHUB_STEP_SUMMARY`
//! or a GitLab job artifact: one table per job, names first.

use super::{Run, render::human_bytes};

fn verdict_word(verdict: &str) -> &'static str {
    match verdict {
        "allow" => "allowed",
        "audit" => "**would be denied** (audit)",
        _ => "**DENIED**",
    }
}

/// Job-controlled text (process names, command) must not break out of a table cell.
pub fn cell(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '|' => "\\|".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '`' => "'".to_string(),
            c if c.is_control() => " ".to_string(),
            c => c.to_string(),
        })
        .collect()
}

pub fn summary(run: &Run) -> String {
    let mut out = format!("### pipeguard egress: `{}`\n\n", cell(&run.command.join(" ")));
    let refused = run.destinations.iter().filter(|d| d.verdict != "allow").count();
    out.push_str(&format!(
        "{} mode · {} destinations · {} not allowed by the policy · {} anomalies\n\n",
        run.mode,
        run.destinations.len(),
        refused,
        run.anomalies.len()
    ));
    if run.destinations.is_empty() {
        out.push_str("No egress.\n");
    } else {
        out.push_str("| Destination | Port | Verdict | Packets | Bytes | Processes |\n");
        out.push_str("|---|---|---|---:|---:|---|\n");
        // Names first, then addresses; each group in the order the run lists them.
        let mut rows: Vec<_> = run.destinations.iter().collect();
        rows.sort_by_key(|d| d.name.is_none());
        for d in rows {
            let dest = match &d.name {
                Some(name) => format!("{} ({})", cell(name), d.ip),
                None => d.ip.to_string(),
            };
            out.push_str(&format!(
                "| {dest} | {}/{} | {} | {} | {} | {} |\n",
                d.port,
                cell(&d.protocol),
                verdict_word(&d.verdict),
                d.packets,
                human_bytes(d.bytes),
                cell(&d.processes.join(", "))
            ));
        }
    }
    if !run.anomalies.is_empty() {
        out.push_str("\n**Anomalies**\n\n");
        for a in &run.anomalies {
            out.push_str(&format!("- {}\n", cell(a)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::Observed;

    #[test]
    fn names_come_first_and_job_text_cannot_break_the_table() {
        let dest = |name: Option<&str>, verdict: &str| Observed {
            name: name.map(str::to_string),
            ip: "10.0.0.1".parse().unwrap(),
            port: 443,
            protocol: "tcp".into(),
            verdict: verdict.into(),
            packets: 2,
            bytes: 4096,
            processes: vec!["a|b".into()],
        };
        let run = Run {
            command: vec!["make".into()],
            mode: "audit".into(),
            destinations: vec![dest(None, "audit"), dest(Some("ghcr.io"), "allow")],
            anomalies: vec!["deny_burst: 30 denials in 10 s".into()],
            ..Run::default()
        };
        let md = summary(&run);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            rows[1].starts_with("| ghcr.io (10.0.0.1) | 443/tcp | allowed | 2 | 4.0 KiB | a\\|b |"),
            "{md}"
        );
        assert!(rows[2].contains("would be denied"), "{md}");
        assert!(md.contains("- deny_burst: 30 denials in 10 s"), "{md}");
    }
}
