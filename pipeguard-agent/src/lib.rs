//! pipeguard: egress enforcement for CI runner pods with cgroup eBPF programs.
//!
//! Layers, each with one job:
//! - [`policy`]: NetworkPolicy parsing, validation and the pure compiler (no kernel, no network).
//! - [`engine`]: loads and attaches the eBPF programs, writes the maps, reads counters and events.
//! - [`cgroup`]: cgroup2 discovery and cgroups pipeguard owns.
//! - [`job`]: one command under enforcement (`pipeguard exec`).
//! - [`learn`]: what a job reached → the policy allowing it; runs merged into a baseline.
//! - [`baseline`]: each CI workload's runs on the cluster (`WorkloadBaseline` objects).
//! - [`agent`]: the DaemonSet (`pipeguard agent`): kube caches, pod cgroups, incremental sync.
//! - [`pod`]: a pod on this node (shared by the agent and the event pipeline).
//! - [`cli`]: one module per subcommand.
//! - [`escape`]: job-controlled text made safe for people to read.

pub mod agent;
pub mod baseline;
pub mod cgroup;
pub mod cli;
pub mod engine;
pub mod escape;
pub mod events;
pub mod job;
pub mod learn;
pub mod memory;
pub mod pod;
pub mod policy;
