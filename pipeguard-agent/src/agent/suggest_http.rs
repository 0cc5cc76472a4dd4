//! `GET /v1/suggest?namespace=NS[&workload=W][&min_runs=N]`: the policies suggested from
//! every node's `WorkloadBaseline` objects of a namespace, read from the API server at
//! query time (so runs recorded on other nodes count). Same access rules as /v1/events.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};

use super::Health;
use crate::{
    baseline::{object::merge, suggest::render},
    events::stream::Access,
};

#[derive(Clone)]
pub struct SuggestState {
    pub health: Arc<Health>,
    pub access: Access,
}

pub async fn handler(
    State(state): State<SuggestState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = state.access.refusal(&headers, "/v1/suggest") {
        return refused;
    }
    let Some(namespace) = params.get("namespace").filter(|n| !n.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "namespace is required\n").into_response();
    };
    let min_runs = match params.get("min_runs").map(|n| n.parse::<usize>()) {
        None => None,
        Some(Ok(n)) if n >= 1 => Some(n),
        Some(_) => return (StatusCode::BAD_REQUEST, "min_runs: a number from 1\n").into_response(),
    };
    let Some(store) = state.health.baselines.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the API server yet\n",
        )
            .into_response();
    };
    let stored = match store.list(Some(namespace)).await {
        Ok(s) => s,
        Err(error) => return (StatusCode::BAD_GATEWAY, format!("{error}\n")).into_response(),
    };
    let mut specs = Vec::new();
    let mut skipped = String::new();
    for s in stored {
        match s.spec {
            Ok(spec) => specs.push(spec),
            Err(error) => skipped.push_str(&format!(
                "# skipped malformed {}/{}: {error}\n",
                s.namespace, s.name
            )),
        }
    }
    match render(
        &merge(&specs),
        params.get("workload").map(String::as_str),
        min_runs,
    ) {
        Ok(text) => (StatusCode::OK, format!("{skipped}{text}")).into_response(),
        Err(error) => (StatusCode::NOT_FOUND, format!("{error}\n")).into_response(),
    }
}
