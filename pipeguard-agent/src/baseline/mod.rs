//! The cluster's memory of each CI workload's egress (issue 17): every agent records the
//! runs (one job pod = one run) it sees into `WorkloadBaseline` objects, one per
//! (workload, node) and written only by that node's agent; `suggest` merges every node's
//! objects at query time, and the agent compares new runs with the workload's stable
//! baseline (`new_destination`, `upload_volume`).

pub mod kube_store;
pub mod object;
pub mod recorder;
pub mod suggest;
pub mod workload;

pub use self::{
    object::{AgentRun, BaselineSpec, MAX_DESTINATIONS, MAX_RUNS},
    workload::Workload,
};
