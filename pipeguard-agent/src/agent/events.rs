//! The agent's violation stream: kernel events enriched with the pod they came from, as
//! JSON lines on stdout.

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};

use crate::engine::events::{self, Clock, Violation};

/// Pod cgroup id → (namespace, pod), replaced after every sync.
#[derive(Clone, Default)]
pub struct PodIndex(Arc<RwLock<HashMap<u64, (String, String)>>>);

impl PodIndex {
    pub fn replace(&self, map: HashMap<u64, (String, String)>) {
        *self.0.write().expect("pod index lock") = map;
    }

    fn get(&self, cgroup_id: u64) -> Option<(String, String)> {
        self.0.read().expect("pod index lock").get(&cgroup_id).cloned()
    }
}

#[derive(Serialize)]
struct Enriched<'a> {
    #[serde(flatten)]
    violation: &'a Violation,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
}

pub async fn pump(ring: RingBuf<MapData>, index: PodIndex, node: String) {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut ring = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "cannot poll the event ring buffer");
            return;
        }
    };
    let clock = Clock::now();
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(g) => g,
            Err(error) => {
                tracing::error!(%error, "event ring buffer");
                return;
            }
        };
        let rb = guard.get_inner_mut();
        let mut out = std::io::stdout().lock();
        while let Some(item) = rb.next() {
            let Some(violation) = events::decode(&item, &clock) else {
                continue;
            };
            let pod = index.get(violation.pod_cgroup_id);
            let line = Enriched {
                violation: &violation,
                node: &node,
                namespace: pod.as_ref().map(|p| p.0.clone()),
                pod: pod.map(|p| p.1),
            };
            if let Ok(json) = serde_json::to_string(&line) {
                let _ = writeln!(out, "{json}");
            }
        }
        let _ = out.flush();
        guard.clear_ready();
    }
}
