//! The sync loop: on every cache or cgroup change (and every [`RESYNC`]), recompute the
//! desired state, apply the difference to the kernel maps, and refresh the metrics.
//!
//! A sync is O(pods): one cgroup scan, one pass over the pods, a diff that writes only what
//! changed; pod cgroup ids and enrichment are cached per pod; the traffic counters are read
//! in one walk (`Metrics::refresh`), never per pod. The periodic resync, when no cache
//! changed and the scan finds the same pod cgroups, stops after the scan: an idle node
//! costs a directory listing and a counter walk every [`RESYNC`], not a recompute. What the loop cannot do (scan, match a
//! new pod cgroup, hear from the API) makes the agent not ready, saying why; the maps keep
//! their last state.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::{
    AgentConfig, AgentError, Health, LocalPod, Status, affected,
    desired::{self, DesiredPod},
    kube, metrics, pod_cgroups, pod_info, readiness, snapshot,
    start::EventParts,
    sync,
    triggers::Work,
    world::{PodDelta, World},
};
use crate::engine::{Engine, PolicyEntries};

/// How often counters and cgroups are re-read even without a change notification.
const RESYNC: Duration = Duration::from_secs(10);

/// How often every local pod is recomputed from the loop's state even when no event said
/// it changed (at a resync).
const RECOMPUTE: Duration = Duration::from_secs(60);

/// What the loop works with, built by the start-up steps.
pub(super) struct Parts<'a> {
    pub(super) config: &'a AgentConfig,
    pub(super) caches: &'a kube::Caches,
    pub(super) root: &'a std::path::Path,
    pub(super) engine: &'a mut Engine,
    pub(super) health: &'a Health,
    pub(super) events: EventParts,
    pub(super) client: ::kube::Client,
}

/// Adopts what a previous agent pinned, then syncs until SIGTERM.
pub(super) async fn run(parts: Parts<'_>) -> Result<(), AgentError> {
    let Parts {
        config,
        caches,
        root,
        engine,
        health,
        events,
        client,
    } = parts;
    // Pinned state from a previous agent is adopted, not overwritten: its allowlists are
    // replaced in the hole-free order and its stale ids deleted.
    let applied = match sync::Applied::adopt(engine) {
        Ok(applied) => applied,
        Err(error) => {
            health.set_not_ready(format!("cannot read the pinned maps: {error}"));
            return Err(AgentError::Adopt(error));
        }
    };
    let mut state = Loop {
        applied,
        parsed: Default::default(),
        parsed_domains: Default::default(),
        last_good: HashMap::new(),
        reported: Default::default(),
        failing_closed: Default::default(),
        escape_capable: Default::default(),
        evented: Default::default(),
        client: config.events.kubernetes.then_some(client),
        cgroup_ids: HashMap::new(),
        infos: Default::default(),
        unmatched: Default::default(),
        rejected: Default::default(),
        last_scan: None,
        world: Default::default(),
        policies: None,
        deps: HashMap::new(),
        desired: Vec::new(),
        paths: HashMap::new(),
    };
    // The first sync has everything to do, including what the caches' first lists and the
    // cgroup watch triggered meanwhile (the pod watch's first list is in it).
    let triggers = &caches.triggers;
    let mut wake = Wake::Work(Work {
        full: true,
        ..triggers.take()
    });
    let mut next_recompute = Instant::now() + RECOMPUTE;
    let mut next_resync = Instant::now() + RESYNC;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Watch)?;
    let mut next_dns_sweep = Instant::now();
    loop {
        health.beat();
        let start = Instant::now();
        let parts = SyncParts {
            config,
            caches,
            root,
            index: &events.index,
            health,
        };
        let outcome = match wake {
            Wake::Work(work) if work.is_empty() => None,
            Wake::Work(work) => Some(state.work(work, engine, &parts)),
            Wake::Timer if Instant::now() >= next_recompute => {
                // The safety net: everything recomputed from the loop's state. It writes
                // nothing unless an incremental step missed something, which it says.
                next_recompute = Instant::now() + RECOMPUTE;
                let outcome = state.sync(true, engine, &parts).map(|(path, stats)| {
                    if stats != sync::SyncStats::default() {
                        tracing::warn!(?stats, "the periodic full recompute changed the maps");
                    }
                    (if path == "full" { "recompute" } else { path }, stats)
                });
                Some(outcome)
            }
            Wake::Timer => Some(state.sync(false, engine, &parts)),
        };
        if let Some(outcome) = outcome {
            match outcome {
                Ok((path, stats)) => {
                    health.set_ready();
                    health
                        .metrics
                        .syncs
                        .get_or_create(&metrics::PathLabels { path })
                        .inc();
                    if path != NEW_PODS && path != REMOVED_PODS {
                        next_resync = Instant::now() + RESYNC;
                    }
                    if stats != sync::SyncStats::default() {
                        // The replaced allowlist and the sync's temporaries (all freed by now)
                        // would otherwise stay in the allocator, several times the live size.
                        crate::memory::release_freed();
                    }
                }
                Err(error) => {
                    // Retried in full at the next wake-up, change or not.
                    state.last_scan = None;
                    health.metrics.sync_errors.inc();
                    health.set_not_ready(format!("writing the kernel maps failed: {error}"));
                }
            }
            health.metrics.sync_seconds.observe(start.elapsed().as_secs_f64());
        }
        // Expired learned addresses and unanswered queries go; the kernel alone enforces
        // expiry, this keeps the LRU maps from evicting live entries.
        if Instant::now() >= next_dns_sweep {
            if let Some(sweep) = engine.sweep_dns_logged() {
                health.metrics.observe_dns_sweep(&sweep);
            }
            next_dns_sweep = Instant::now() + crate::engine::dns::SWEEP_INTERVAL;
        }
        // No metrics refresh here: /metrics refreshes at scrape time, and a refresh walks
        // the pod and socket tables, too much for every wake-up under pod churn.
        health
            .metrics
            .unmatched_pod_cgroups
            .set(state.unmatched.len() as i64);
        health.set_problem("watch", caches.watches.failing(config.watch_failure_bound));
        engine.drain_kernel_logs();
        // While a pod cgroup waits to be matched, look again soon: the window is short.
        let (due, source) = if state.unmatched.is_empty() {
            (next_resync, "resync")
        } else {
            (next_resync.min(Instant::now() + readiness::RECHECK), "recheck")
        };
        wake = tokio::select! {
            _ = triggers.notified() => Wake::Work(triggers.take()),
            _ = tokio::time::sleep_until(due) => {
                triggers.count(source);
                // Whatever was triggered meanwhile makes it a sync after a change.
                match triggers.take() {
                    work if work.is_empty() => Wake::Timer,
                    work => Wake::Work(Work { full: true, ..work }),
                }
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: detaching and exiting");
                return Ok(());
            }
        }
    }
}

/// Why the loop woke up.
enum Wake {
    /// Triggered: a cache or the cgroup tree changed.
    Work(Work),
    /// The periodic resync (or a recheck of unmatched pod cgroups), nothing triggered.
    Timer,
}

/// The `path` label of `pipeguard_syncs_total` for the incremental path.
const NEW_PODS: &str = "new_pods";
/// The `path` label of `pipeguard_syncs_total` for pod cgroups that went.
const REMOVED_PODS: &str = "removed_pods";

/// What a sync reads besides its own state.
struct SyncParts<'a> {
    config: &'a AgentConfig,
    caches: &'a kube::Caches,
    root: &'a std::path::Path,
    index: &'a crate::events::pipeline::PodIndex,
    health: &'a Health,
}

struct Loop {
    applied: sync::Applied,
    parsed: snapshot::PolicyCache,
    parsed_domains: super::domain_objects::DomainObjectCache,
    /// Last applied allowlist per pod UID, for fail-closed.
    last_good: HashMap<String, std::sync::Arc<PolicyEntries>>,
    /// Policy errors already logged, so each is logged once.
    reported: std::collections::HashSet<String>,
    /// Pods currently failing closed (UIDs), reported when they start to.
    failing_closed: std::collections::HashSet<String>,
    /// Guarded pods that can step around the guard (UIDs), reported when first seen.
    escape_capable: std::collections::HashSet<String>,
    /// Errors of invalid domain objects an Event was posted for (while they stay invalid).
    evented: std::collections::HashSet<String>,
    /// For Kubernetes Events; `None` with --no-kube-events.
    client: Option<::kube::Client>,
    /// Pod cgroup directory → its id (one syscall per pod, once).
    cgroup_ids: HashMap<std::path::PathBuf, u64>,
    infos: pod_info::InfoCache,
    unmatched: readiness::Unmatched,
    /// Rejected NetworkPolicies (namespace, name, resourceVersion) already posted as Events.
    rejected: std::collections::HashSet<(String, String, String)>,
    /// The pod cgroups of the last complete sync, sorted by path (`None`: the next sync
    /// recomputes).
    last_scan: Option<Vec<pod_cgroups::PodCgroup>>,
    /// The cluster, kept from the watch events.
    world: World,
    /// The compiled policies (`None`: the next change takes the full path).
    policies: Option<crate::policy::PolicySet>,
    /// Per local pod UID: indices into `policies` of the policies its allowlist is compiled
    /// from (see `affected`).
    deps: HashMap<String, Vec<usize>>,
    /// What was applied and published, one entry per local pod.
    desired: Vec<DesiredPod>,
    /// Pod cgroup id → its directory.
    paths: HashMap<u64, std::path::PathBuf>,
}

impl Loop {
    /// What a wake-up brought: the changes go into the loop's state, then the full path
    /// (a relist, a domain object, no full sync yet) or only the pods the changes can
    /// affect, then the removed pod cgroups' entries, then the new ones'.
    fn work(
        &mut self,
        work: Work,
        engine: &mut Engine,
        parts: &SyncParts<'_>,
    ) -> Result<(&'static str, sync::SyncStats), crate::engine::EngineError> {
        let Work {
            mut full,
            created,
            removed,
            relisted,
            pods,
            namespaces,
            policy_namespaces,
        } = work;
        if let Some(records) = relisted {
            self.world.replace_pods(records);
            full = true;
        }
        let deltas: Vec<PodDelta> = pods
            .into_iter()
            .map(|(key, record)| self.world.apply_pod(key, record))
            .collect();
        let mut namespace_deltas = Vec::new();
        for name in namespaces {
            let labels = parts
                .caches
                .namespaces
                .get(&::kube::runtime::reflector::ObjectRef::new(&name))
                .map(|ns| ns.metadata.labels.clone().unwrap_or_default());
            let (old, new) = self.world.set_namespace(&name, labels);
            if old != new {
                namespace_deltas.push((name, old, new) as affected::NamespaceDelta);
            }
        }
        if full || self.last_scan.is_none() || self.policies.is_none() {
            return self.sync(true, engine, parts);
        }
        let affected = match &self.policies {
            Some(policies) => affected::affected(
                &affected::Changes {
                    pods: &deltas,
                    namespaces: &namespace_deltas,
                    policy_namespaces: &policy_namespaces,
                },
                policies,
                &self.world.cluster,
                self.desired.iter().map(|d| &d.pod),
                &self.deps,
            ),
            None => self.desired.iter().map(|d| d.pod.uid.clone()).collect(),
        };
        let local_changed = deltas.iter().any(|d| !d.local.is_empty());
        let mut done = ("unaffected", sync::SyncStats::default());
        if !policy_namespaces.is_empty() {
            self.refresh_policies(parts);
        }
        if !affected.is_empty() || local_changed || !policy_namespaces.is_empty() {
            done = ("changed", self.recompute(Some(&affected), engine, parts)?);
        }
        if !removed.is_empty() {
            done = match self.remove_pods(&removed, engine, parts) {
                Some(removed) => removed?,
                None => return self.sync(true, engine, parts),
            };
        }
        if created.is_empty() {
            return Ok(done);
        }
        match self.add_pods(created, engine, parts) {
            Some(added) => added,
            None => self.sync(true, engine, parts),
        }
    }

    /// The full path: scan, recompute every local pod, apply the difference. `changed`: a
    /// cache or the cgroup tree changed (else the periodic resync, which stops after the
    /// scan when nothing moved). Returns the path taken and what was written.
    fn sync(
        &mut self,
        changed: bool,
        engine: &mut Engine,
        parts: &SyncParts<'_>,
    ) -> Result<(&'static str, sync::SyncStats), crate::engine::EngineError> {
        let SyncParts {
            caches, root, health, ..
        } = *parts;
        let cgroups = match pod_cgroups::scan(root) {
            Ok(cgroups) => {
                health.set_problem("cgroup scan", None);
                cgroups
            }
            Err(error) => {
                // An empty scan would delete every pod entry, and with `--unknown-pods allow`
                // open guarded pods. Keep the maps as they are; the next event or the
                // periodic resync scans again. New pods cannot be registered meanwhile, so
                // the agent is not ready and says so. What changed meanwhile is applied by
                // the next sync that scans, change notification or not.
                self.last_scan = None;
                health.set_problem(
                    "cgroup scan",
                    Some(format!(
                        "scanning pod cgroups under {} failed: {error}; kernel state kept as is, new pod cgroups are not registered",
                        root.display()
                    )),
                );
                return Ok(("scan_failed", sync::SyncStats::default()));
            }
        };
        // Nothing the desired state is computed from has moved (no cache notified, same pod
        // cgroups, none waiting to be matched): the kernel maps already hold it.
        if !changed && self.unmatched.is_empty() && self.last_scan.as_ref() == Some(&cgroups) {
            return Ok(("unchanged", sync::SyncStats::default()));
        }
        self.last_scan = Some(cgroups);
        // Namespaces are few: re-read whole (a relist of them comes as a full sync).
        let mut namespaces = BTreeMap::new();
        for ns in caches.namespaces.state() {
            if let Some(name) = &ns.metadata.name {
                namespaces.insert(name.clone(), ns.metadata.labels.clone().unwrap_or_default());
            }
        }
        self.world.cluster.namespaces.clear();
        for (name, labels) in namespaces {
            self.world.cluster.add_namespace(&name, labels);
        }
        self.refresh_policies(parts);
        let stats = self.recompute(None, engine, parts)?;
        Ok(("full", stats))
    }

    /// Re-reads the policy objects (parsed once per version), reports them.
    fn refresh_policies(&mut self, parts: &SyncParts<'_>) {
        let SyncParts {
            config,
            caches,
            health,
            ..
        } = *parts;
        let policy_objects = caches.policies.state();
        let mut policies = self.parsed.policies(&policy_objects);
        let invalid_domains = self.parsed_domains.add_to(
            &mut policies,
            &[
                (&caches.domains.resource, caches.domains.objects()),
                (&caches.cluster_domains.resource, caches.cluster_domains.objects()),
            ],
        );
        self.report_policies(&policy_objects, &policies, health, &config.node_name);
        self.report_domains(caches, &policies, invalid_domains, &config.node_name, health);
        // Indices into the old set mean nothing in the new one. Pods outside the changed
        // namespaces keep their allowlists, so only their dependencies are re-read.
        let local: Vec<LocalPod> = self.desired.iter().map(|d| d.pod.clone()).collect();
        self.deps = affected::all_dependencies(&policies, &local);
        self.policies = Some(policies);
    }

    /// Recomputes the local pods in `affected` (all with `None`; and any pod whose cgroup,
    /// labels or object changed), keeps the others' last result, applies the difference.
    fn recompute(
        &mut self,
        affected: Option<&HashSet<String>>,
        engine: &mut Engine,
        parts: &SyncParts<'_>,
    ) -> Result<sync::SyncStats, crate::engine::EngineError> {
        let SyncParts { config, health, .. } = *parts;
        let scan = self.last_scan.clone().unwrap_or_default();
        let (local, paths, unmatched) = local_pods(&mut self.cgroup_ids, &self.world.scheduled, scan);
        health.set_problem(
            "pod cgroups",
            self.unmatched.check(&unmatched, std::time::Instant::now()),
        );
        let empty = crate::policy::PolicySet::default();
        let policies = self.policies.as_ref().unwrap_or(&empty);
        let (desired, recomputed) = affected::merge(
            &config.settings,
            policies,
            &self.world.cluster,
            &local,
            |pod| affected.is_none_or(|a| a.contains(&pod.uid)),
            std::mem::take(&mut self.desired),
            &self.last_good,
            &mut self.deps,
        );
        let stats = self.applied.apply(engine, &desired)?;
        if stats != sync::SyncStats::default() {
            tracing::info!(?stats, pods = desired.len(), recomputed, "synced");
        }
        self.desired = desired;
        self.paths = paths;
        self.publish(parts);
        Ok(stats)
    }

    /// The incremental path: new pod cgroups of pods the loop knows get their entries (and
    /// their allowlist, if no pod has it yet); nothing else is recomputed or written.
    /// `None` when it cannot (no full sync to build on, or a pod it does not know): the
    /// caller takes the full path.
    fn add_pods(
        &mut self,
        created: Vec<pod_cgroups::PodCgroup>,
        engine: &mut Engine,
        parts: &SyncParts<'_>,
    ) -> Option<Result<(&'static str, sync::SyncStats), crate::engine::EngineError>> {
        let policies = self.policies.as_ref()?;
        self.last_scan.as_ref()?;
        let mut local = Vec::new();
        let mut found = Vec::new();
        for cg in created {
            if self.cgroup_ids.contains_key(&cg.path) {
                continue; // the last scan found it already
            }
            let pod = self.world.scheduled.get(&cg.uid)?;
            let Ok(cgroup_id) = crate::cgroup::cgroup_id(&cg.path) else {
                continue; // removed meanwhile
            };
            local.push(local_pod(&cg.uid, pod, cgroup_id));
            found.push((cg, cgroup_id));
        }
        // A new runner pod changes its workflow pods' selection: that takes the full path.
        let runs_another = |new: &LocalPod| {
            self.desired.iter().any(|d| {
                d.pod.namespace == new.namespace
                    && super::workflow_pod::runner_of(&d.pod.labels) == Some(new.name.as_str())
            })
        };
        if local.iter().any(runs_another) {
            return None;
        }
        let new: std::collections::HashSet<String> = local.iter().map(|p| p.uid.clone()).collect();
        // Every local pod is context (a new workflow pod's runner may be among them).
        let mut all: Vec<LocalPod> = self.desired.iter().map(|d| d.pod.clone()).collect();
        all.extend(local);
        let desired = desired::compute_some(
            &parts.config.settings,
            policies,
            &self.world.cluster,
            &all,
            |pod| new.contains(&pod.uid),
            &self.last_good,
        );
        for pod in all.iter().filter(|p| new.contains(&p.uid)) {
            self.deps
                .insert(pod.uid.clone(), affected::dependencies(policies, pod, &all));
        }
        let mut stats = sync::SyncStats::default();
        for d in &desired {
            match self.applied.add(engine, d) {
                Ok(added) => stats += added,
                Err(error) => return Some(Err(error)),
            }
        }
        // Recorded as the scan would have found them, so the periodic resync sees no change.
        let scan = self.last_scan.as_mut()?;
        for (cg, cgroup_id) in found {
            self.cgroup_ids.insert(cg.path.clone(), cgroup_id);
            self.paths.insert(cgroup_id, cg.path.clone());
            let at = scan.partition_point(|c| c.path < cg.path);
            scan.insert(at, cg);
        }
        tracing::debug!(?stats, pods = desired.len(), "new pods synced");
        self.desired.extend(desired);
        self.publish(parts);
        Some(Ok((NEW_PODS, stats)))
    }

    /// The incremental path for pod cgroups that went (finished pods): their entries go,
    /// and allowlists no pod uses any more; nothing is recomputed. `None` when it cannot (no
    /// full sync to build on, a cgroup back under the same path, one no pod was matched to,
    /// or a runner whose workflow pods' selection changes): the caller takes the full path.
    fn remove_pods(
        &mut self,
        removed: &[pod_cgroups::PodCgroup],
        engine: &mut Engine,
        parts: &SyncParts<'_>,
    ) -> Option<Result<(&'static str, sync::SyncStats), crate::engine::EngineError>> {
        self.policies.as_ref()?;
        self.last_scan.as_ref()?;
        let mut gone = HashMap::new();
        for cg in removed {
            // Unknown: created and removed between two wake-ups, never scanned, or its pod
            // object went first (then it is unmatched, and only the scan holds it).
            let Some(&cgroup_id) = self.cgroup_ids.get(&cg.path) else {
                continue;
            };
            let pod = self.desired.iter().find(|d| d.pod.cgroup_id == cgroup_id)?;
            if cg.path.exists() {
                return None;
            }
            gone.insert(cgroup_id, (cg.path.clone(), pod.pod.clone()));
        }
        let runs_a_gone_pod = |d: &DesiredPod| {
            let runner = super::workflow_pod::runner_of(&d.pod.labels);
            gone.values()
                .any(|(_, p)| p.namespace == d.pod.namespace && runner == Some(p.name.as_str()))
        };
        if self.desired.iter().any(runs_a_gone_pod) {
            return None;
        }
        for (cgroup_id, (path, pod)) in &gone {
            self.cgroup_ids.remove(path);
            self.paths.remove(cgroup_id);
            self.deps.remove(&pod.uid);
        }
        // Every removed directory leaves the scan, matched or not: an unmatched one left
        // behind would be rechecked on every sync for as long as no full scan runs, and
        // under steady pod churn none does.
        let mut vanished: HashSet<&std::path::Path> = HashSet::new();
        for cg in removed.iter().filter(|cg| !cg.path.exists()) {
            self.unmatched.forget(&cg.uid);
            vanished.insert(cg.path.as_path());
        }
        if let Some(scan) = self.last_scan.as_mut() {
            scan.retain(|c| !vanished.contains(c.path.as_path()));
        }
        self.desired.retain(|d| !gone.contains_key(&d.pod.cgroup_id));
        let stats = match self.applied.apply(engine, &self.desired) {
            Ok(stats) => stats,
            Err(error) => return Some(Err(error)),
        };
        tracing::debug!(?stats, pods = gone.len(), "removed pods synced");
        self.publish(parts);
        Some(Ok((REMOVED_PODS, stats)))
    }

    /// Everything after the maps are written: status gauges, fail-closed reports, last
    /// good allowlists, escape notes, the pods metrics and the event pipeline know.
    fn publish(&mut self, parts: &SyncParts<'_>) {
        let SyncParts {
            config,
            index,
            health,
            ..
        } = *parts;
        let desired = &self.desired;
        let mut by_status: HashMap<&'static str, i64> = HashMap::new();
        for d in desired {
            let status = match &d.status {
                Status::NotGuarded => "not_guarded",
                Status::Unrestricted => "unrestricted",
                Status::Enforced(_) => "enforced",
                Status::DefaultDeny => "default_deny",
                Status::FailedClosed {
                    reason,
                    kept_last_good,
                } => {
                    // Logged and posted on the pod once per episode, not on every sync.
                    if self.failing_closed.insert(d.pod.uid.clone()) {
                        tracing::warn!(namespace = %d.pod.namespace, pod = %d.pod.name, %reason, kept_last_good, "failing closed");
                        if let Some(client) = &self.client {
                            crate::events::kube_events::post_failed_closed(
                                client.clone(),
                                &d.pod,
                                reason,
                                *kept_last_good,
                                &config.node_name,
                            );
                        }
                    }
                    "failed_closed"
                }
                Status::RefusedPrivileged { .. } => "refused_privileged",
            };
            *by_status.entry(status).or_default() += 1;
            if status != "failed_closed" {
                self.failing_closed.remove(&d.pod.uid);
            }
            if matches!(
                d.status,
                Status::Enforced(_) | Status::DefaultDeny | Status::Unrestricted
            ) && let Some(applied) = self.applied.allowlist_of(d.pod.cgroup_id)
            {
                // Shared with the applied state, not a copy.
                self.last_good.insert(d.pod.uid.clone(), applied);
            }
        }
        let notes = super::bypass::report(
            desired,
            &mut self.escape_capable,
            self.client.as_ref(),
            &config.node_name,
        );
        by_status.insert("escape_capable", notes.len() as i64);
        health.set_notes(notes);
        let present: std::collections::HashSet<&str> = desired.iter().map(|d| d.pod.uid.as_str()).collect();
        self.last_good.retain(|uid, _| present.contains(uid.as_str()));
        self.failing_closed.retain(|uid| present.contains(uid.as_str()));
        self.publish_gauges(&by_status, health);
        health.metrics.set_pods(
            desired
                .iter()
                .map(|d| (d.pod.cgroup_id, (d.pod.namespace.clone(), d.pod.name.clone())))
                .collect(),
        );
        index.replace(self.infos.refresh(desired, &self.world.objects, &self.paths));
    }

    /// Pods by status, allowlists and map sizes, as of this sync.
    fn publish_gauges(&self, by_status: &HashMap<&'static str, i64>, health: &Health) {
        for status in [
            "not_guarded",
            "unrestricted",
            "enforced",
            "default_deny",
            "failed_closed",
            "refused_privileged",
            "escape_capable",
        ] {
            health
                .metrics
                .pods
                .get_or_create(&metrics::StateLabels { state: status.into() })
                .set(*by_status.get(status).unwrap_or(&0));
        }
        health.metrics.allowlists.set(self.applied.policy_count() as i64);
        let (v4, v6, pod_entries) = self.applied.map_entries();
        for (map, n) in [("allow_v4", v4), ("allow_v6", v6), ("pods", pod_entries)] {
            health
                .metrics
                .map_entries
                .get_or_create(&metrics::MapLabels { map: map.into() })
                .set(n as i64);
        }
        health
            .metrics
            .allow_entries
            .set(self.applied.entry_count() as i64);
    }

    fn report_policies(
        &mut self,
        objects: &[Arc<super::raw_policy::RawPolicy>],
        set: &crate::policy::PolicySet,
        health: &Health,
        node: &str,
    ) {
        let mut errors = std::collections::HashSet::new();
        for error in &set.errors {
            let text = error.to_string();
            if self.reported.insert(text.clone()) {
                tracing::error!(error = %text, "policy rejected; the guarded pods it could select fail closed");
            }
            errors.insert(text);
        }
        // Errors that are gone are forgotten: fixed and broken again is a new episode.
        self.reported.retain(|text| errors.contains(text));
        let compiled: std::collections::HashSet<(&str, &str)> = set
            .policies
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        let mut rejected = std::collections::HashSet::new();
        health.metrics.policy_compiled.clear();
        for obj in objects {
            let namespace = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            let ok = compiled.contains(&(namespace.as_str(), name.as_str()));
            if !ok {
                let key = (
                    namespace.clone(),
                    name.clone(),
                    obj.metadata.resource_version.clone().unwrap_or_default(),
                );
                // One Event on the policy per rejected version.
                if !self.rejected.contains(&key)
                    && let Some(client) = &self.client
                {
                    let error = set
                        .errors
                        .iter()
                        .find(|e| {
                            e.namespace.as_deref() == Some(namespace.as_str())
                                && e.object
                                    .as_deref()
                                    .is_some_and(|o| o.ends_with(&format!("/{name}")))
                        })
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "it does not parse".into());
                    crate::events::kube_events::post_policy_rejected(
                        client.clone(),
                        crate::events::kube_events::PodEvent {
                            namespace: &namespace,
                            name: &name,
                            uid: obj.metadata.uid.as_deref().unwrap_or_default(),
                        },
                        &error,
                        node,
                    );
                }
                rejected.insert(key);
            }
            health
                .metrics
                .policy_compiled
                .get_or_create(&metrics::PolicyLabels {
                    namespace: namespace.into(),
                    name: name.into(),
                })
                .set(ok as i64);
        }
        self.rejected = rejected;
        // NetworkPolicies only: each invalid domain policy has one error and one taint.
        let failed = set.errors.len().saturating_sub(set.domain_taints.len()) as i64;
        health
            .metrics
            .policies
            .get_or_create(&metrics::StateLabels {
                state: "compiled".into(),
            })
            .set(set.policies.len() as i64);
        health
            .metrics
            .policies
            .get_or_create(&metrics::StateLabels {
                state: "failed".into(),
            })
            .set(failed);
    }

    /// Invalid domain objects: a Warning Event on each (once per error), the counts, and
    /// whether each CRD is installed.
    fn report_domains(
        &mut self,
        caches: &kube::Caches,
        set: &crate::policy::PolicySet,
        invalid: Vec<(
            k8s_openapi::api::core::v1::ObjectReference,
            crate::policy::PolicyError,
        )>,
        node: &str,
        health: &Health,
    ) {
        for (object, error) in &invalid {
            if self.evented.insert(error.to_string())
                && let Some(client) = &self.client
            {
                crate::events::policy_events::post_invalid_policy(
                    client.clone(),
                    object.clone(),
                    &error.to_string(),
                    node,
                );
            }
        }
        self.evented
            .retain(|text| invalid.iter().any(|(_, e)| &e.to_string() == text));
        for (state, n) in [("compiled", set.domains.len()), ("failed", invalid.len())] {
            health
                .metrics
                .domain_policies
                .get_or_create(&metrics::StateLabels { state: state.into() })
                .set(n as i64);
        }
        for cache in [&caches.domains, &caches.cluster_domains] {
            health
                .metrics
                .domain_crd_missing
                .get_or_create(&metrics::KindLabels {
                    kind: cache.resource.kind.clone(),
                })
                .set(cache.crd_missing() as i64);
        }
    }
}

/// The scheduled pods whose cgroup was found (with the cgroup's id and directory), and
/// the pod cgroups that match no pod scheduled here.
fn local_pods(
    cgroup_ids: &mut HashMap<std::path::PathBuf, u64>,
    scheduled: &BTreeMap<String, snapshot::ScheduledPod>,
    cgroups: Vec<pod_cgroups::PodCgroup>,
) -> (
    Vec<LocalPod>,
    HashMap<u64, std::path::PathBuf>,
    Vec<pod_cgroups::PodCgroup>,
) {
    let mut local = Vec::new();
    let mut paths = HashMap::new();
    let mut unmatched = Vec::new();
    let mut ids = HashMap::with_capacity(cgroups.len());
    for cg in cgroups {
        let Some(pod) = scheduled.get(&cg.uid) else {
            unmatched.push(cg);
            continue;
        };
        let cgroup_id = match cgroup_ids.get(&cg.path) {
            Some(id) => *id,
            None => match crate::cgroup::cgroup_id(&cg.path) {
                Ok(id) => id,
                // Removed meanwhile.
                Err(_) => continue,
            },
        };
        ids.insert(cg.path.clone(), cgroup_id);
        local.push(local_pod(&cg.uid, pod, cgroup_id));
        paths.insert(cgroup_id, cg.path);
    }
    // A directory recreated under the same name gets a new id: only present ones stay.
    *cgroup_ids = ids;
    (local, paths, unmatched)
}

fn local_pod(uid: &str, pod: &snapshot::ScheduledPod, cgroup_id: u64) -> LocalPod {
    LocalPod {
        uid: uid.to_string(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        labels: pod.labels.clone(),
        cgroup_id,
        escape: pod.escape.clone(),
    }
}
