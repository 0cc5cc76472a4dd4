//! Where `exec` writes violation events: JSON lines on stderr (default), stdout or a file.

use std::{
    fs::File,
    io::{self, Write},
    path::PathBuf,
    time::Instant,
};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    engine::events::{self, Clock},
    events::anomaly::{Anomaly, Detectors},
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

    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Self::Stderr => writeln!(io::stderr().lock(), "{line}"),
            Self::Stdout => writeln!(io::stdout().lock(), "{line}"),
            Self::File(f) => writeln!(f, "{line}"),
        }
    }
}

/// What exec derives from the events besides the events themselves.
pub struct Watch {
    /// The kernel's name table, for `dst_name` on events.
    pub names: Option<crate::engine::dns::NameTexts>,
    /// Names of the job's learned destinations seen on events, and the refused queries.
    pub dns: DnsSeen,
    pub processes: ProcessLog,
    pub detectors: Detectors,
    /// Anomalies raised, in order (each also written to the sink).
    pub anomalies: Vec<Anomaly>,
}

impl Watch {
    pub fn new(detectors: Detectors, names: Option<crate::engine::dns::NameTexts>) -> Self {
        Self {
            names,
            dns: DnsSeen::default(),
            processes: ProcessLog::default(),
            detectors,
            anomalies: Vec::new(),
        }
    }

    /// Writes an anomaly to the sink and keeps it for the summary.
    pub fn raise(&mut self, anomaly: Anomaly, sink: &mut EventSink) -> io::Result<()> {
        let line = serde_json::to_string(&anomaly).map_err(io::Error::other)?;
        sink.write_line(&line)?;
        self.anomalies.push(anomaly);
        Ok(())
    }
}

/// What the summary needs from the events about names: the name of each destination an
/// event named, and every refused (or audited) query.
#[derive(Debug, Default)]
pub struct DnsSeen {
    pub names: std::collections::HashMap<std::net::IpAddr, String>,
    /// (verdict, question name, qtype) → attempts.
    pub queries: std::collections::BTreeMap<(&'static str, String, String), u64>,
}

/// Refused names kept for the summary at most (a job looping over random names must not
/// grow exec without bound); the rest are counted under one entry.
const MAX_QUERIES_KEPT: usize = 1_000;

impl DnsSeen {
    fn record(&mut self, event: &events::Violation) {
        if let (Some(ip), Some(name)) = (event.dst_ip, &event.dst_name)
            && (self.names.len() < MAX_QUERIES_KEPT || self.names.contains_key(&ip))
        {
            self.names.insert(ip, name.clone());
        }
        if event.hook != "dns" || event.verdict == "allow" {
            return;
        }
        let mut key = (
            event.verdict,
            event.query.clone().unwrap_or_else(|| "(malformed query)".into()),
            event.qtype.clone().unwrap_or_default(),
        );
        if self.queries.len() >= MAX_QUERIES_KEPT && !self.queries.contains_key(&key) {
            key = (event.verdict, "(other names)".into(), String::new());
        }
        *self.queries.entry(key).or_default() += 1;
    }
}

/// Reads the ring buffer until `stop` turns true, then drains what is left. Returns how
/// many violation events were delivered, what the watch saw, and the sink.
pub async fn pump(
    ring: RingBuf<MapData>,
    clock: Clock,
    mut sink: EventSink,
    mut watch: Watch,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<(u64, Watch, EventSink)> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
    let mut delivered = 0;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                delivered += drain(guard.get_inner_mut(), &clock, &mut sink, &mut watch)?;
                guard.clear_ready();
            }
            _ = stop.changed() => {
                delivered += drain(ring.get_mut(), &clock, &mut sink, &mut watch)?;
                return Ok((delivered, watch, sink));
            }
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    clock: &Clock,
    sink: &mut EventSink,
    watch: &mut Watch,
) -> io::Result<u64> {
    let mut n = 0;
    while let Some(item) = ring.next() {
        let Some(event) = events::decode_named(&item, clock, &mut watch.names) else {
            tracing::warn!(len = item.len(), "undecodable kernel event record");
            continue;
        };
        watch.processes.record(&event);
        watch.dns.record(&event);
        for anomaly in watch.detectors.on_attempt(&event, 1, Instant::now()) {
            watch.raise(anomaly, sink)?;
        }
        // Allowed attempts are reported only for learning and the detectors.
        if event.verdict != "allow" {
            let line = serde_json::to_string(&event).map_err(io::Error::other)?;
            sink.write_line(&line)?;
            n += 1;
        }
    }
    Ok(n)
}
