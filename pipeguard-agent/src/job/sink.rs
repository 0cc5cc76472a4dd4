//! Where `exec` writes violation events: JSON lines on stderr (default), stdout or a file.

use std::{
    fs::File,
    io::{self, Write},
    path::PathBuf,
};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    engine::events::{self, Clock},
    learn::ProcessLog,
};

pub enum EventSink {
    Stderr,
    Stdout,
    File(File),
}

impl EventSink {
    /// `-` is stdout; no value is stderr; anything else is a file, appended to.
    pub fn open(target: Option<&PathBuf>) -> io::Result<Self> {
        Ok(match target {
            None => Self::Stderr,
            Some(p) if p.as_os_str() == "-" => Self::Stdout,
            Some(p) => Self::File(File::options().create(true).append(true).open(p)?),
        })
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Self::Stderr => writeln!(io::stderr().lock(), "{line}"),
            Self::Stdout => writeln!(io::stdout().lock(), "{line}"),
            Self::File(f) => writeln!(f, "{line}"),
        }
    }
}

/// Reads the ring buffer until `stop` turns true, then drains what is left. Returns how
/// many violation events were delivered, and the processes every event named.
pub async fn pump(
    ring: RingBuf<MapData>,
    clock: Clock,
    mut sink: EventSink,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<(u64, ProcessLog)> {
    let mut processes = ProcessLog::default();
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
    let mut delivered = 0;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                delivered += drain(guard.get_inner_mut(), &clock, &mut sink, &mut processes)?;
                guard.clear_ready();
            }
            _ = stop.changed() => {
                delivered += drain(ring.get_mut(), &clock, &mut sink, &mut processes)?;
                return Ok((delivered, processes));
            }
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    clock: &Clock,
    sink: &mut EventSink,
    processes: &mut ProcessLog,
) -> io::Result<u64> {
    let mut n = 0;
    while let Some(item) = ring.next() {
        match events::decode(&item, clock) {
            // Reported only while learning: who reached an allowed destination.
            Some(allowed) if allowed.verdict == "allow" => processes.record(&allowed),
            Some(violation) => {
                processes.record(&violation);
                let line = serde_json::to_string(&violation).map_err(io::Error::other)?;
                sink.write_line(&line)?;
                n += 1;
            }
            None => tracing::warn!(len = item.len(), "undecodable kernel event record"),
        }
    }
    Ok(n)
}
