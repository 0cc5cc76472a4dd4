//! `cargo xtask demo`: a guarded CI job on loopback. A local "artifact registry" listens on
//! 127.0.0.1, a local "attacker" on a loopback address of its own (127.0.66.6), and a real
//! DNS resolver on 127.0.53.53 answers the job's lookups. The job (demo/job.sh) uploads to
//! the registry by name, tries to send a token to the attacker over TCP and UDP, and hides
//! it in a DNS query. pipeguard lets the upload through, refuses the exfiltration and
//! prints the violation events and its summary.
//!
//! The demo then checks the story from four sources (what the listeners received, the
//! resolver's query log, the job's output, the events) as a list of [`Step`]s, and fails
//! when any step did not happen. A new part of the story is a new entry in [`STEPS`].

mod listeners;
mod resolver;

use std::{
    io::{BufRead, BufReader, IsTerminal as _},
    path::Path,
    process::{Command, ExitCode, ExitStatus, Stdio},
};

use anyhow::{Context, Result, bail};

use self::{
    listeners::{Log, Received},
    resolver::{RESOLVER_IP, Resolver},
};

const REGISTRY: &str = "127.0.0.1:8181";
/// The registry's name in demo/job.sh and demo/policy.yaml.
const REGISTRY_NAME: &str = "registry.pg.test";
/// An address of its own, so its events carry no name: the registry's learned name would
/// label any event about 127.0.0.1.
const ATTACKER: &str = "127.0.66.6:9999";
/// What demo/job.sh sends out, and the name it hides it in.
const TOKEN: &str = "ghp_demo0123456789secret";
const EXFIL_NAME: &str = "ghp_demo0123456789secret.attacker.pg.test";
/// What demo/job.sh uploads.
const UPLOAD_PATH: &str = "/artifacts/app-1.0.tar.gz";
const UPLOAD_BODY: &[u8] = b"artifact-bytes-01234";

/// What the demo saw, from every source.
struct Observed {
    /// The job's and pipeguard's output (stdout and stderr, in order), events included.
    output: Vec<String>,
    /// What the listeners received.
    received: Log,
    /// The queries that reached the resolver ("query[A] NAME from ADDR").
    queries: Vec<String>,
    status: ExitStatus,
}

impl Observed {
    fn said(&self, line: &str) -> bool {
        self.output.iter().any(|l| l.trim_end() == line)
    }

    /// Violation events (JSON lines) for a denied attempt to `dst` over `protocol`.
    fn denials(&self, protocol: &str, dst: &str) -> usize {
        let (ip, port) = dst.split_once(':').expect("ip:port");
        self.denials_with(&[
            format!(r#""protocol":"{protocol}""#),
            format!(r#""dst_ip":"{ip}""#),
            format!(r#""dst_port":{port}"#),
        ])
    }

    /// Deny events (JSON lines) with every one of `fields`.
    fn denials_with(&self, fields: &[String]) -> usize {
        self.output
            .iter()
            .filter(|l| l.starts_with('{') && l.contains(r#""verdict":"deny""#))
            .filter(|l| fields.iter().all(|f| l.contains(f.as_str())))
            .count()
    }

    /// Queries that reached the resolver for names containing `part`.
    fn queries_for(&self, part: &str) -> Vec<&String> {
        self.queries.iter().filter(|q| q.contains(part)).collect()
    }
}

/// One part of the story and how to tell it happened.
struct Step {
    what: &'static str,
    check: fn(&Observed) -> Result<String, String>,
}

const STEPS: &[Step] = &[
    Step {
        what: "the job ran to its end",
        check: |o| {
            if o.status.success() && o.said("job: done") {
                Ok(format!("pipeguard exec exited with {}", o.status))
            } else {
                Err(format!(
                    "pipeguard exec exited with {} and the job {} \"job: done\"",
                    o.status,
                    if o.said("job: done") {
                        "printed"
                    } else {
                        "never printed"
                    }
                ))
            }
        },
    },
    Step {
        what: "the job found the registry by name through the resolver",
        check: |o| {
            let asked = format!("query[A] {REGISTRY_NAME} from ");
            if o.queries.iter().any(|q| q.starts_with(&asked)) {
                Ok(format!(
                    "the resolver's log shows the job's A query for {REGISTRY_NAME}"
                ))
            } else {
                Err(format!(
                    "the resolver never received an A query for {REGISTRY_NAME}; it received {:?}",
                    o.queries
                ))
            }
        },
    },
    Step {
        what: "the upload to the registry completed",
        check: |o| {
            let request = format!("PUT {UPLOAD_PATH} HTTP/1.0 (Host: {REGISTRY_NAME})");
            let uploads: Vec<Received> = o
                .received
                .from("registry")
                .into_iter()
                .filter(|r| r.summary == request && r.body == UPLOAD_BODY)
                .collect();
            let answered = o.said(&format!("job: {REGISTRY_NAME} answered: HTTP/1.0 201 Created"));
            match (uploads.len(), answered) {
                (1, true) => Ok(format!(
                    "the registry received PUT {UPLOAD_PATH} for {REGISTRY_NAME} with its {} bytes; the job saw 201 Created",
                    UPLOAD_BODY.len()
                )),
                (n, _) => Err(format!(
                    "{n} complete uploads received (want 1); the job {} the 201 answer; registry log: {:?}",
                    if answered { "saw" } else { "did not see" },
                    o.received.from("registry")
                )),
            }
        },
    },
    Step {
        what: "the TCP exfiltration was attempted and refused",
        check: |o| exfiltration(o, "tcp", "job: TCP exfiltration blocked"),
    },
    Step {
        what: "the UDP exfiltration was attempted and refused",
        check: |o| exfiltration(o, "udp", "job: UDP exfiltration blocked"),
    },
    Step {
        what: "the DNS exfiltration was attempted and refused",
        check: dns_exfiltration,
    },
];

/// Attempted (the job says its lookup failed), refused (the resolver's own log never shows
/// the token) and reported (a deny event of the DNS hook that names the query).
fn dns_exfiltration(o: &Observed) -> Result<String, String> {
    let leaked = o.queries_for(TOKEN);
    if !leaked.is_empty() {
        return Err(format!("the resolver received {leaked:?}"));
    }
    let job_line = "job: DNS exfiltration blocked";
    if !o.said(job_line) {
        return Err(format!("the job never printed {job_line:?}"));
    }
    let events = o.denials_with(&[
        r#""hook":"dns""#.to_string(),
        format!(r#""query":"{EXFIL_NAME}""#),
        format!(r#""dst_ip":"{RESOLVER_IP}""#),
        r#""dst_port":53"#.to_string(),
    ]);
    if events == 0 {
        return Err(format!(
            "no deny event of the dns hook naming the query {EXFIL_NAME} to {RESOLVER_IP}:53"
        ));
    }
    Ok(format!(
        "the lookup failed, the resolver never received it, {events} deny event(s) of the dns hook name the query {EXFIL_NAME}"
    ))
}

/// Attempted (the job says the kernel refused it), refused (the attacker got nothing) and
/// reported (a deny event for it).
fn exfiltration(o: &Observed, protocol: &str, job_line: &str) -> Result<String, String> {
    let listener = match protocol {
        "tcp" => "attacker (tcp)",
        _ => "attacker (udp)",
    };
    let leaked = o.received.from(listener);
    let events = o.denials(protocol, ATTACKER);
    if !o.said(job_line) {
        return Err(format!("the job never printed {job_line:?}"));
    }
    if !leaked.is_empty() {
        return Err(format!("the attacker received {leaked:?}"));
    }
    if events == 0 {
        return Err(format!("no deny event for {ATTACKER}/{protocol}"));
    }
    Ok(format!(
        "the job's send failed, the attacker received nothing, {events} deny event(s) for {ATTACKER}/{protocol}"
    ))
}

pub fn run(pipeguard: &Path, root: &Path) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
    }
    let received = Log::default();
    listeners::registry(REGISTRY, received.clone())?;
    listeners::attacker(ATTACKER, received.clone())?;
    let mut resolver = Resolver::start()?;

    println!("\n== running demo/job.sh under pipeguard (policy: demo/policy.yaml)\n");
    let (output, status) = run_job(pipeguard, root, &resolver)?;
    let observed = Observed {
        output,
        received,
        queries: resolver.queries()?,
        status,
    };

    println!("\n== what the listeners received");
    let all = observed.received.all();
    for r in &all {
        match r.body.len() {
            0 => println!("  {}: {}", r.listener, r.summary),
            n => println!("  {}: {} ({n} bytes of body)", r.listener, r.summary),
        }
    }
    if !all.iter().any(|r| r.listener.starts_with("attacker")) {
        println!("  attacker: nothing");
    }
    for query in &observed.queries {
        println!("  resolver: {query}");
    }

    println!("\n== the story, checked");
    let mut failed = 0;
    for step in STEPS {
        match (step.check)(&observed) {
            Ok(how) => println!("  ok      {}: {how}", step.what),
            Err(why) => {
                failed += 1;
                println!("  FAILED  {}: {why}", step.what);
            }
        }
    }
    if failed > 0 {
        println!("\ndemo FAILED: {failed} of {} steps did not happen", STEPS.len());
        return Ok(ExitCode::FAILURE);
    }
    println!("\ndemo complete: all {} steps happened", STEPS.len());
    Ok(ExitCode::SUCCESS)
}

/// Runs the job under `pipeguard exec`, echoing its output (stdout and stderr through one
/// pipe, so the order is kept) and returning it with the exit status.
fn run_job(pipeguard: &Path, root: &Path, resolver: &Resolver) -> Result<(Vec<String>, ExitStatus)> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let mut cmd = Command::new(pipeguard);
    cmd.args([
        "exec",
        "--policy",
        "demo/policy.yaml",
        "--namespace",
        "ci",
        "--label",
        "app=runner",
    ])
    .args(["--events", "-", "--", "bash", "demo/job.sh"])
    .current_dir(root)
    // Its output goes through a pipe to us; colour only if ours is a terminal.
    .envs((!std::io::stdout().is_terminal()).then_some(("NO_COLOR", "1")))
    .stdin(Stdio::null())
    .stdout(writer.try_clone().context("duplicating the pipe")?)
    .stderr(writer);
    resolver.route_lookups(&mut cmd)?;
    let mut child = cmd.spawn().context("running pipeguard exec")?;
    // Our copies of the write end go with the Command, so the read ends when pipeguard and
    // the job have exited.
    drop(cmd);
    let mut output = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading the job's output")?;
        println!("{line}");
        output.push(line);
    }
    let status = child.wait().context("waiting for pipeguard exec")?;
    Ok((output, status))
}
