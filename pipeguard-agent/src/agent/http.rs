//! /healthz, /readyz and /metrics on `--listen`.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::metrics::Metrics;
use crate::events::stream::StreamState;

/// What the endpoints report; written by the agent's loop.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
    pub metrics: Metrics,
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.metrics.ready.set(1);
        self.reason.lock().expect("health lock").clear();
    }

    /// Not ready, and why (shown by /readyz and logged).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::warn!(%reason, "not ready");
        self.ready.store(false, Ordering::SeqCst);
        self.metrics.ready.set(0);
        *self.reason.lock().expect("health lock") = reason;
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

pub fn router(health: Arc<Health>, events: Option<StreamState>) -> Router {
    let base = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    match events {
        Some(state) => base.merge(
            Router::new()
                .route("/v1/events", get(crate::events::stream::handler))
                .with_state(state),
        ),
        None => base,
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let reason = health.reason.lock().expect("health lock").clone();
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"))
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>, events: Option<StreamState>) {
    if let Err(error) = axum::serve(listener, router(health, events)).await {
        tracing::error!(%error, "HTTP server stopped");
    }
}
