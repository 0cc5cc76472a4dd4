//! `pipeguard exec` on a real terminal: a pseudo-terminal (openpty) is the controlling
//! terminal of pipeguard, ^C is typed on it, and the job counts the SIGINTs it gets.
//! Needs root (exec loads eBPF programs); fails without it.

mod common;

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::require_kernel;

const READY: &str = "SIGINT-COUNTER ready";
const COUNT: &str = "SIGINT-COUNTER count=";

/// The job: counts SIGINTs until one second after the first, then prints the count and
/// who sent each (si_code 128: the kernel, i.e. the terminal; 0: kill() from si_pid).
/// The test gives it a real-time priority, so each signal is handled the moment it is
/// sent: a first one still pending when a second arrives would merge with it and hide a
/// double delivery.
#[test]
#[ignore = "the job of the tty test: runs only when re-executed by it"]
fn sigint_counter_main() {
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
    static COUNTED: AtomicU32 = AtomicU32::new(0);
    static SENDERS: [AtomicI32; 8] = [const { AtomicI32::new(-1) }; 8];
    extern "C" fn on_sigint(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let n = COUNTED.fetch_add(1, Ordering::SeqCst) as usize;
        if n < 4 {
            // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
            let (code, pid) = unsafe { ((*info).si_code, (*info).si_pid()) };
            SENDERS[2 * n].store(code, Ordering::SeqCst);
            SENDERS[2 * n + 1].store(pid, Ordering::SeqCst);
        }
    }
    // SAFETY: the handler only touches atomics; the sigaction struct is fully initialised.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
    println!("{READY} pid={}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while COUNTED.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Time for a second (forwarded) copy to arrive, if one is coming.
    std::thread::sleep(Duration::from_secs(1));
    let senders: Vec<i32> = SENDERS.iter().map(|s| s.load(Ordering::SeqCst)).collect();
    println!(
        "{COUNT}{} senders(code,pid)={senders:?}",
        COUNTED.load(Ordering::SeqCst)
    );
}

/// Reads the terminal's output on a thread, line by line, into a channel.
fn follow(master: File) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut master = master;
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last process holding the terminal is gone.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            pending.extend_from_slice(&buf[..n]);
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if tx
                    .send(String::from_utf8_lossy(&line).trim_end().to_string())
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    rx
}

fn wait_for_line(rx: &mpsc::Receiver<String>, prefix: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if let Some(i) = line.find(prefix) {
                    return line[i..].to_string();
                }
            }
            Err(e) => panic!(
                "no line with {prefix:?} ({e}); the terminal showed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// SCHED_FIFO for every thread of `pid` (set from here: the job may lack CAP_SYS_NICE).
fn realtime(pid: i32) {
    let param = libc::sched_param { sched_priority: 10 };
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the job's threads") {
        let tid: i32 = task.unwrap().file_name().to_string_lossy().parse().unwrap();
        // SAFETY: plain syscall with a valid sched_param.
        let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) };
        assert_eq!(rc, 0, "SCHED_FIFO for {tid}: {}", std::io::Error::last_os_error());
    }
}

#[test]
fn ctrl_c_on_the_terminal_reaches_the_job_exactly_once() {
    require_kernel();
    let dir = std::env::temp_dir().join(format!("pg-tty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: none, namespace: ci}\n\
         spec: {podSelector: {}, policyTypes: [Egress]}\n",
    )
    .unwrap();

    let (mut master_fd, mut slave_fd) = (-1, -1);
    // SAFETY: openpty writes two descriptors; no name, termios or size requested.
    let rc = unsafe {
        libc::openpty(
            &mut master_fd,
            &mut slave_fd,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned here alone.
    let (master, slave) = unsafe { (File::from_raw_fd(master_fd), OwnedFd::from_raw_fd(slave_fd)) };

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeguard"));
    cmd.args(["exec", "--namespace", "ci", "--policy"])
        .arg(&policy)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args([
            "sigint_counter_main",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    // SAFETY: setsid and ioctl are async-signal-safe. pipeguard becomes a session leader
    // with the terminal as its controlling terminal and its group in the foreground, as
    // a shell would run it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start pipeguard exec");
    drop(cmd);
    drop(slave);
    let lines = follow(master.try_clone().unwrap());
    let mut seen = Vec::new();
    let ready = wait_for_line(&lines, READY, &mut seen);
    let job: i32 = ready
        .rsplit_once("pid=")
        .and_then(|(_, p)| p.trim().parse().ok())
        .expect("the job's pid");
    realtime(job);

    // ^C, as typed: the terminal's line discipline turns it into SIGINT for its
    // foreground process group.
    (&master).write_all(&[0x03]).unwrap();
    let count = wait_for_line(&lines, COUNT, &mut seen);
    let status = child.wait().unwrap();
    eprintln!("job: {count}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        count.starts_with(&format!("{COUNT}1 ")),
        "one ^C must reach the job once: {count}; pipeguard exited with {status}; the terminal showed:\n{}",
        seen.join("\n")
    );
}
