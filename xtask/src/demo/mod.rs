//! `cargo xtask demo`: a guarded CI job on loopback. A local "artifact registry" and a
//! local "attacker" listen on 127.0.0.1; the job (demo/job.sh) uploads to the first and
//! tries to send a token to the second over TCP and UDP. pipeguard lets the upload
//! through, refuses the exfiltration and prints the violation events and its summary.
//!
//! The demo then checks the story from three sources (what the listeners received, the
//! job's output, the events) as a list of [`Step`]s, and fails when any step did not
//! happen. A new part of the story is a new listener and a new entry in [`STEPS`].

mod listeners;

use std::{
    io::{BufRead, BufReader, IsTerminal as _},
    path::Path,
    process::{Command, ExitCode, ExitStatus, Stdio},
};

use anyhow::{Context, Result, bail};

use self::listeners::{Log, Received};

const REGISTRY: &str = "127.0.0.1:8181";
const ATTACKER: &str = "127.0.0.1:9999";
/// What demo/job.sh uploads.
const UPLOAD_PATH: &str = "/artifacts/app-1.0.tar.gz";
const UPLOAD_BODY: &[u8] = b"artifact-bytes-01234";

/// What the demo saw, from every source.
struct Observed {
    /// The job's and pipeguard's output (stdout and stderr, in order), events included.
    output: Vec<String>,
    /// What the listeners received.
    received: Log,
    status: ExitStatus,
}

impl Observed {
    fn said(&self, line: &str) -> bool {
        self.output.iter().any(|l| l.trim_end() == line)
    }

    /// Violation events (JSON lines) for a denied attempt to `dst` over `protocol`.
    fn denials(&self, protocol: &str, dst: &str) -> usize {
        let (ip, port) = dst.split_once(':').expect("ip:port");
        self.output
            .iter()
            .filter(|l| l.starts_with('{'))
            .filter(|l| {
                l.contains(r#""verdict":"deny""#)
                    && l.contains(&format!(r#""protocol":"{protocol}""#))
                    && l.contains(&format!(r#""dst_ip":"{ip}""#))
                    && l.contains(&format!(r#""dst_port":{port}"#))
            })
            .count()
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
        what: "the upload to the registry completed",
        check: |o| {
            let uploads: Vec<Received> = o
                .received
                .from("registry")
                .into_iter()
                .filter(|r| r.summary == format!("PUT {UPLOAD_PATH} HTTP/1.0") && r.body == UPLOAD_BODY)
                .collect();
            let answered = o.said("job: registry answered: HTTP/1.0 201 Created");
            match (uploads.len(), answered) {
                (1, true) => Ok(format!(
                    "the registry received PUT {UPLOAD_PATH} with its {} bytes; the job saw 201 Created",
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
];

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

    println!("\n== running demo/job.sh under pipeguard (policy: demo/policy.yaml)\n");
    let (output, status) = run_job(pipeguard, root)?;
    let observed = Observed {
        output,
        received,
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
fn run_job(pipeguard: &Path, root: &Path) -> Result<(Vec<String>, ExitStatus)> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let mut child = Command::new(pipeguard)
        .args([
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
        .stderr(writer)
        .spawn()
        .context("running pipeguard exec")?;
    // Our copies of the write end are gone (moved into the Command, dropped with it), so
    // the read ends when pipeguard and the job have exited.
    let mut output = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading the job's output")?;
        println!("{line}");
        output.push(line);
    }
    let status = child.wait().context("waiting for pipeguard exec")?;
    Ok((output, status))
}
