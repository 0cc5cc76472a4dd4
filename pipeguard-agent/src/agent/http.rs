//! /healthz, /readyz and /metrics on `--listen`.
//!
//! Ready means: started, the last sync applied, and no standing problem (a watch failing for
//! too long, a cgroup scan failing, a pod cgroup left unmatched). Each problem is reported
//! by name, so /readyz says every reason at once. Alive means the sync loop (or, during
//! start, the step it is waiting in) has beaten recently.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::{
    listener::{Connections, Limits},
    metrics::Metrics,
};
use crate::events::stream::StreamState;

/// Not alive when the loop has not beaten for this long (it beats at least every resync).
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// What the endpoints report; written by the agent's loop.
pub struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
    /// Standing problems by name (e.g. "cgroup scan"), each with why.
    problems: Mutex<BTreeMap<&'static str, String>>,
    born: Instant,
    /// Milliseconds since `born` of the last heartbeat.
    beat_ms: AtomicU64,
    pub connections: Arc<Connections>,
    /// Lines /readyz adds below its verdict: pods that can step around the guard.
    notes: Mutex<Vec<String>>,
    pub metrics: Metrics,
    /// Where /v1/suggest reads the workload baselines; set once the API client exists.
    pub baselines: std::sync::OnceLock<crate::baseline::kube_store::Store>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            problems: Mutex::default(),
            notes: Mutex::default(),
            born: Instant::now(),
            beat_ms: AtomicU64::new(0),
            connections: Arc::default(),
            metrics: Metrics::default(),
            baselines: std::sync::OnceLock::new(),
        }
    }
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.reason.lock().expect("health lock").clear();
        self.publish_ready();
    }

    /// Not ready, and why (shown by /readyz and logged).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::warn!(%reason, "not ready");
        self.ready.store(false, Ordering::SeqCst);
        *self.reason.lock().expect("health lock") = reason;
        self.publish_ready();
    }

    /// Sets (`Some`) or clears (`None`) a standing problem; logged when it starts and ends.
    pub fn set_problem(&self, name: &'static str, problem: Option<String>) {
        let mut problems = self.problems.lock().expect("health lock");
        match problem {
            Some(why) => {
                if problems.get(name) != Some(&why) {
                    tracing::warn!(problem = name, reason = %why, "not ready");
                    problems.insert(name, why);
                }
            }
            None => {
                if problems.remove(name).is_some() {
                    tracing::info!(problem = name, "resolved");
                }
            }
        }
        drop(problems);
        self.publish_ready();
    }

    /// Replaces the detail lines /readyz shows.
    pub fn set_notes(&self, notes: Vec<String>) {
        *self.notes.lock().expect("health lock") = notes;
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.problems.lock().expect("health lock").is_empty()
    }

    /// Every reason the agent is not ready, empty when it is.
    pub fn reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ready.load(Ordering::SeqCst) {
            out.push(self.reason.lock().expect("health lock").clone());
        }
        for (name, why) in self.problems.lock().expect("health lock").iter() {
            out.push(format!("{name}: {why}"));
        }
        out
    }

    fn publish_ready(&self) {
        self.metrics.ready.set(self.is_ready() as i64);
    }

    /// The loop is alive.
    pub fn beat(&self) {
        self.beat_ms
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last heartbeat.
    pub fn since_beat(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.beat_ms.load(Ordering::Relaxed)))
    }
}

pub fn router(health: Arc<Health>, events: Option<StreamState>) -> Router {
    let base = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health.clone());
    match events {
        Some(state) => base
            .merge(
                Router::new()
                    .route("/v1/suggest", get(super::suggest_http::handler))
                    .with_state(super::suggest_http::SuggestState {
                        health,
                        access: state.access.clone(),
                    }),
            )
            .merge(
                Router::new()
                    .route("/v1/events", get(crate::events::stream::handler))
                    .with_state(state),
            ),
        None => base,
    }
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let since = health.since_beat();
    if since <= LIVENESS_BOUND {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the sync loop has not run for {}s\n", since.as_secs()),
        )
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let reasons = health.reasons();
    let (status, mut body) = if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    };
    for note in health.notes.lock().expect("health lock").iter() {
        body.push_str(note);
        body.push('\n');
    }
    (status, body)
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health.metrics.observe_http(&health.connections);
    health.metrics.refresh();
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

/// Serves the endpoints within the default limits for this process's descriptor limit.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>, events: Option<StreamState>) {
    let nofile = current_fd_limit();
    serve_with(listener, health, events, Limits::for_fd_limit(nofile)).await;
}

pub async fn serve_with(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    events: Option<StreamState>,
    limits: Limits,
) {
    let connections = health.connections.clone();
    super::listener::serve(listener, router(health, events), limits, connections).await;
}

fn current_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}
