//! Stdout and the events file, off the pipeline's path: each sink has its own writer thread
//! behind a bounded queue. A sink that blocks (a pipe nobody reads, a file on a FIFO or a
//! hung network mount) loses its own records, counted in `pipeguard_event_sink_dropped_total`,
//! and never delays the stream subscribers, the other sink or the Kubernetes Events.

use std::{
    io,
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{self, TrySendError},
    },
};

use super::{pipeline::Stats, record::Record, sinks::Sink};

/// Records a sink may have queued before new ones are dropped for it: a burst of distinct
/// records (one per destination a scan tries) fits, a sink stalled for good costs at most
/// this many records of memory.
pub const SINK_QUEUE: usize = 16_384;

/// The sinks, by the `sink` label of the drop counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    Stdout,
    File,
}

impl SinkKind {
    pub const ALL: [SinkKind; 2] = [SinkKind::Stdout, SinkKind::File];

    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Stdout => "stdout",
            SinkKind::File => "file",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The pipeline's end of one sink.
pub struct SinkQueue {
    kind: SinkKind,
    tx: mpsc::SyncSender<Arc<Record>>,
    stats: Arc<Stats>,
}

impl SinkQueue {
    /// Starts the sink's writer thread.
    pub fn spawn(kind: SinkKind, mut sink: impl Sink, stats: Arc<Stats>) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Arc<Record>>(SINK_QUEUE);
        let errors = stats.clone();
        std::thread::Builder::new()
            .name(format!("sink-{}", kind.name()))
            .spawn(move || {
                // Each failure is counted; the first of a run of failures is logged.
                let mut failing = false;
                let mut failed = |result: io::Result<()>| match result {
                    Ok(()) => failing = false,
                    Err(error) => {
                        errors.sink_errors.fetch_add(1, Ordering::Relaxed);
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(sink = kind.name(), %error, "writing violation records");
                        }
                    }
                };
                // Ends when the pipeline (the only sender) goes away.
                while let Ok(record) = rx.recv() {
                    failed(sink.write(&record));
                    while let Ok(record) = rx.try_recv() {
                        failed(sink.write(&record));
                    }
                    failed(sink.flush());
                }
            })?;
        Ok(Self { kind, tx, stats })
    }

    /// Queues the record; drops it (counted) when the sink is that far behind.
    pub fn send(&self, record: Arc<Record>) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(record) {
            self.stats.sink_dropped[self.kind.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}
