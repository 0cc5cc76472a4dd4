//! Fan-out to subscribers. Each has a bounded queue; one that falls behind is dropped with
//! a reason instead of stalling the others or the agent.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::mpsc;

use super::record::Record;

/// Records a subscriber may have queued before it counts as too slow.
pub const SUBSCRIBER_QUEUE: usize = 4096;

pub struct Subscription {
    pub records: mpsc::Receiver<Arc<Record>>,
    /// Set when the hub dropped this subscriber, with why.
    pub dropped: Arc<Mutex<Option<String>>>,
}

struct Subscriber {
    namespace: Option<String>,
    tx: mpsc::Sender<Arc<Record>>,
    dropped: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
    pub dropped_subscribers: AtomicU64,
    pub published: AtomicU64,
}

impl Hub {
    /// `namespace`: only records of pods in it.
    pub fn subscribe(&self, namespace: Option<String>) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let dropped = Arc::new(Mutex::new(None));
        self.subscribers.lock().expect("hub lock").push(Subscriber {
            namespace,
            tx,
            dropped: dropped.clone(),
        });
        Subscription { records: rx, dropped }
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.lock().expect("hub lock").len()
    }

    pub fn publish(&self, record: Record) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let record = Arc::new(record);
        let mut subs = self.subscribers.lock().expect("hub lock");
        subs.retain(|s| {
            let wanted = match (&s.namespace, &record.pod) {
                (None, _) => true,
                (Some(ns), Some(pod)) => &pod.namespace == ns,
                (Some(_), None) => false,
            };
            if !wanted {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(record.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    *s.dropped.lock().expect("subscriber lock") =
                        Some(format!("slow consumer: {SUBSCRIBER_QUEUE} records behind"));
                    self.dropped_subscribers.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}
