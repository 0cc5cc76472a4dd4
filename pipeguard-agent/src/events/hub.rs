//! Fan-out to subscribers. Each has a bounded queue; one that falls behind is dropped with
//! a reason instead of stalling the others or the agent. A subscriber leaves the table the
//! moment its `Subscription` is dropped (the client went away), not at the next record.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;

use super::record::Record;

/// Records a subscriber may have queued before it counts as too slow.
pub const SUBSCRIBER_QUEUE: usize = 4096;

type Table = Mutex<HashMap<u64, Subscriber>>;

pub struct Subscription {
    pub records: mpsc::Receiver<Arc<Record>>,
    /// Set when the hub dropped this subscriber, with why.
    pub dropped: Arc<Mutex<Option<String>>>,
    _leave: Leave,
}

/// Removes its subscriber from the hub's table when dropped.
struct Leave {
    table: Weak<Table>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            let mut table = table.lock().expect("hub lock");
            table.remove(&self.id);
            // After a crowd leaves, give the table's memory back too.
            if table.capacity() > 64 && table.len() < table.capacity() / 4 {
                table.shrink_to_fit();
            }
        }
    }
}

struct Subscriber {
    namespace: Option<String>,
    tx: mpsc::Sender<Arc<Record>>,
    dropped: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
pub struct Hub {
    subscribers: Arc<Table>,
    next_id: AtomicU64,
    pub dropped_subscribers: AtomicU64,
    pub published: AtomicU64,
}

impl Hub {
    /// `namespace`: only records of pods in it.
    pub fn subscribe(&self, namespace: Option<String>) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let dropped = Arc::new(Mutex::new(None));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers.lock().expect("hub lock").insert(
            id,
            Subscriber {
                namespace,
                tx,
                dropped: dropped.clone(),
            },
        );
        Subscription {
            records: rx,
            dropped,
            _leave: Leave {
                table: Arc::downgrade(&self.subscribers),
                id,
            },
        }
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.lock().expect("hub lock").len()
    }

    pub fn publish(&self, record: impl Into<Arc<Record>>) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let record = record.into();
        let mut subs = self.subscribers.lock().expect("hub lock");
        subs.retain(|_, s| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_leaves_when_its_subscription_is_dropped_without_any_record() {
        let hub = Hub::default();
        let subs: Vec<_> = (0..1000).map(|_| hub.subscribe(None)).collect();
        assert_eq!(hub.subscriber_count(), 1000);
        drop(subs);
        assert_eq!(hub.subscriber_count(), 0, "nothing was published, still all gone");
        for _ in 0..10_000 {
            drop(hub.subscribe(Some("ci".into())));
        }
        assert_eq!(hub.subscriber_count(), 0);
        assert!(hub.subscribers.lock().unwrap().capacity() <= 64 * 2);
    }
}
