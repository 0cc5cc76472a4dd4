//! `GET /v1/events`: the live violation stream over HTTP, as NDJSON or Server-Sent Events
//! (`Accept: text/event-stream`), with an optional `?namespace=` filter.
//!
//! Access: a bearer token read from a file (a mounted Secret). Without one configured, the
//! endpoint is off unless the listener is on loopback. A wrong or missing token gets 401;
//! tokens are compared in constant time.

use std::{collections::HashMap, convert::Infallible, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::stream;

use super::hub::Hub;

/// A quiet stream writes a keep-alive this often (well inside the listener's idle timeout).
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

#[derive(Clone)]
pub enum Access {
    /// No token and a non-loopback listener: the stream is off.
    Off,
    /// Loopback listener without a token: local clients only, no token needed.
    Loopback,
    Token(Arc<Vec<u8>>),
}

impl Access {
    pub fn new(token: Option<Vec<u8>>, listen: std::net::SocketAddr) -> Self {
        match token {
            Some(t) if !t.is_empty() => Self::Token(Arc::new(t)),
            _ if listen.ip().is_loopback() => Self::Loopback,
            _ => Self::Off,
        }
    }
}

impl Access {
    /// The response refusing a request for `what` with these `headers`, or `None` when they
    /// grant access.
    pub fn refusal(&self, headers: &HeaderMap, what: &str) -> Option<Response> {
        match self {
            Self::Off => Some(
                (
                    StatusCode::NOT_FOUND,
                    format!("{what} is off: configure --events-token-file\n"),
                )
                    .into_response(),
            ),
            Self::Loopback => None,
            Self::Token(token) => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(|t| t.trim().as_bytes());
                (!given.is_some_and(|g| constant_time_eq(g, token))).then(|| {
                    (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "unauthorized\n",
                    )
                        .into_response()
                })
            }
        }
    }
}

/// Equal length and equal bytes, without an early exit an attacker could time.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
pub struct StreamState {
    pub hub: Arc<Hub>,
    pub access: Access,
}

pub async fn handler(
    State(state): State<StreamState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = state.access.refusal(&headers, "the event stream") {
        return refused;
    }
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let sub = state
        .hub
        .subscribe(params.get("namespace").cloned().filter(|n| !n.is_empty()));
    let frame = move |json: String| -> Bytes {
        if sse {
            Bytes::from(format!("data: {json}\n\n"))
        } else {
            Bytes::from(format!("{json}\n"))
        }
    };
    let keepalive = if sse {
        Bytes::from_static(b": keep-alive\n\n")
    } else {
        // An empty line: NDJSON readers skip it.
        Bytes::from_static(b"\n")
    };
    let body = stream::unfold((sub, false), move |(mut sub, done)| {
        let keepalive = keepalive.clone();
        async move {
            if done {
                return None;
            }
            let next = tokio::select! {
                record = sub.records.recv() => record,
                // Keeps a quiet stream from looking idle to the listener, and finds a
                // client that went away (the write fails) even when no record comes.
                () = tokio::time::sleep(KEEPALIVE) => {
                    return Some((Ok::<_, Infallible>(keepalive), (sub, false)));
                }
            };
            match next {
                Some(record) => {
                    let json = serde_json::to_string(&*record).unwrap_or_default();
                    Some((Ok(frame(json)), (sub, false)))
                }
                // The hub let go of this subscriber: say why, then end the stream.
                None => {
                    let reason = sub.dropped.lock().expect("subscriber lock").clone()?;
                    let json =
                        serde_json::json!({"kind": "subscriber_dropped", "reason": reason}).to_string();
                    Some((Ok(frame(json)), (sub, true)))
                }
            }
        }
    });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn access_defaults() {
        let lo: std::net::SocketAddr = "127.0.0.1:9440".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:9440".parse().unwrap();
        assert!(matches!(Access::new(None, lo), Access::Loopback));
        assert!(matches!(Access::new(None, any), Access::Off));
        assert!(matches!(Access::new(Some(b"t".to_vec()), any), Access::Token(_)));
        assert!(
            matches!(Access::new(Some(Vec::new()), any), Access::Off),
            "an empty token file is no token"
        );
    }
}
