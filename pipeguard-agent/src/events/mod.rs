//! The violation event stream: every blocked (or audited) attempt, aggregated, enriched
//! with the pod, CI job, process and policy, and delivered to stdout, a rotating file,
//! Kubernetes Events on the pod, and `GET /v1/events` subscribers.

pub mod aggregate;
pub mod anomaly;
pub mod client;
pub mod hub;
pub mod job_table;
pub mod kube_events;
pub mod kube_limit;
pub mod pipeline;
pub mod policy_events;
pub mod record;
pub mod sink_queue;
pub mod sinks;
pub mod stream;
