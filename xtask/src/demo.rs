//! `cargo xtask demo`: a guarded CI job on loopback. A local "artifact registry" and a
//! local "attacker" listen on 127.0.0.1; the job (demo/job.sh) uploads to the first and
//! tries to send a token to the second. pipeguard lets the upload through, blocks the
//! exfiltration and prints the violation events and its summary.

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    path::Path,
    process::{Command, ExitCode},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

const REGISTRY: &str = "127.0.0.1:8181";
const ATTACKER: &str = "127.0.0.1:9999";

type Log = Arc<Mutex<Vec<String>>>;

pub fn run(pipeguard: &Path, root: &Path) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("the demo loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
    }
    let log: Log = Arc::default();
    registry(log.clone())?;
    attacker(log.clone())?;

    println!("\n== running demo/job.sh under pipeguard (policy: demo/policy.yaml)\n");
    let status = Command::new(pipeguard)
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
        .status()
        .context("running pipeguard exec")?;
    thread::sleep(Duration::from_millis(200));

    println!("\n== what the listeners received");
    let log = log.lock().unwrap();
    for line in log.iter() {
        println!("  {line}");
    }
    let leaked = log.iter().any(|l| l.starts_with("attacker"));
    let uploaded = log.iter().any(|l| l.starts_with("registry"));
    if !leaked {
        println!("  attacker: nothing");
    }
    println!("\npipeguard exec exited with {status}");
    if leaked || !uploaded {
        println!("demo FAILED: the upload must succeed and the attacker must receive nothing");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn bind_tcp(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("the demo needs {addr} free"))
}

/// Answers every upload with 201 Created.
fn registry(log: Log) -> Result<()> {
    let listener = bind_tcp(REGISTRY)?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let first = request.lines().next().unwrap_or_default().to_string();
            let _ = stream.write_all(b"HTTP/1.0 201 Created\r\n\r\n");
            log.lock().unwrap().push(format!("registry: {first} ({n} bytes)"));
        }
    });
    Ok(())
}

/// Records anything that reaches it, over TCP or UDP.
fn attacker(log: Log) -> Result<()> {
    let tcp = bind_tcp(ATTACKER)?;
    let udp = UdpSocket::bind(ATTACKER).with_context(|| format!("the demo needs udp {ATTACKER} free"))?;
    let tcp_log = log.clone();
    thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let mut got = Vec::new();
            let _ = (&stream).read_to_end(&mut got);
            tcp_log
                .lock()
                .unwrap()
                .push(format!("attacker (tcp): {}", String::from_utf8_lossy(&got)));
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = udp.recv_from(&mut buf) {
            log.lock()
                .unwrap()
                .push(format!("attacker (udp): {}", String::from_utf8_lossy(&buf[..n])));
        }
    });
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
