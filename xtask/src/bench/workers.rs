//! Long-lived worker processes driven line by line over stdin/stdout.

use std::{
    fs,
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::net::Sample;

/// A long-lived worker process talking line by line over stdin/stdout.
pub(super) struct Worker {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr_path: PathBuf,
    finished: bool,
}

impl Worker {
    pub(super) fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Self> {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = fs::File::create(&stderr_path)?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting worker {name}: {cmd:?}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut w = Self {
            name: name.to_string(),
            child,
            stdin,
            stdout,
            stderr_path,
            finished: false,
        };
        let line = w.read_line()?;
        if line != "ready" {
            bail!("worker {name} said {line:?} instead of ready");
        }
        Ok(w)
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
            bail!("worker {} exited; its stderr:\n{}", self.name, stderr.trim_end());
        }
        Ok(line.trim_end().to_string())
    }

    pub(super) fn ask(&mut self, command: &str) -> Result<Sample> {
        let stdin = self.stdin.as_mut().context("worker already closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        let line = self.read_line()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["ok", ops, secs, bytes] => Ok(Sample {
                ops: ops.parse()?,
                secs: secs.parse()?,
                bytes: bytes.parse()?,
            }),
            _ => bail!("worker {} on {command:?}: {line}", self.name),
        }
    }

    /// Closes stdin (the worker exits), waits, and returns what it wrote on stderr.
    pub(super) fn finish(mut self) -> Result<String> {
        self.stdin = None;
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))?;
        self.finished = true;
        let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        match status {
            Some(_) => Ok(stderr),
            None => bail!("worker {} did not exit", self.name),
        }
    }
}

pub(super) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stdin = None;
        let pid = self.child.id() as i32;
        // EOF first, then TERM (pipeguard forwards it and removes its cgroup), then KILL;
        // only ever our own child.
        for sig in [0, libc::SIGTERM, libc::SIGKILL] {
            if sig != 0 {
                // SAFETY: signalling our own, not yet reaped, child.
                unsafe { libc::kill(pid, sig) };
            }
            if let Ok(Some(_)) = wait_timeout(&mut self.child, Duration::from_secs(5)) {
                return;
            }
        }
        let _ = self.child.wait();
    }
}
