//! Watches on Pods, Namespaces and NetworkPolicies. All pods in the cluster are watched
//! because selector peers need their IPs; only the fields the compiler reads are kept, and
//! for pods not in a reflector store but in the sync loop's `world` (one copy, passed with
//! each change: 50,000 pod objects in a store were most of the agent's 443 MiB).
//! Watch errors, 410 Gone and API server restarts are retried with backoff by the watcher;
//! the stores keep the last known state meanwhile, so an outage never opens egress.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    raw_policy::RawPolicy,
    triggers::Triggers,
    watch_events::{WatchBackoff, api_answered, changed_cache},
    world::{PodKey, PodRecord},
};
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubernetes client configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// In-cluster config, KUBECONFIG, or `--kubeconfig`, as kubectl infers it.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    // Every response passes the size limits (see `api_limits`).
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&super::api_limits::LimitLayer)
        .build())
}

/// Which watches are failing, and since when (a watch that fails and recovers within the
/// bound is normal: API server restarts, 410 Gone).
#[derive(Default)]
pub struct Watches {
    /// Kind → (first error of this run of errors, last error, its text).
    failing: std::sync::Mutex<std::collections::BTreeMap<String, (Instant, Instant, String)>>,
}

/// A failing watch retries with backoff (at most 20 s apart, see `WatchBackoff`), each
/// retry an error; one with no error for this long has recovered, even when its kind has
/// had no change to report since (bookmarks are not passed on, so silence is all there is).
const RECOVERED_AFTER: Duration = Duration::from_secs(45);

impl Watches {
    pub(super) fn failed(&self, kind: &str, error: String) {
        let mut failing = self.failing.lock().expect("watches lock");
        let now = Instant::now();
        let since = failing.get(kind).map_or(now, |(t, _, _)| *t);
        failing.insert(kind.to_string(), (since, now, error));
    }

    pub(super) fn succeeded(&self, kind: &str) {
        self.failing.lock().expect("watches lock").remove(kind);
    }

    /// Why the agent is not ready, if some watch has failed for longer than `bound`.
    pub fn failing(&self, bound: Duration) -> Option<String> {
        let mut failing = self.failing.lock().expect("watches lock");
        failing.retain(|_, (_, last, _)| last.elapsed() < RECOVERED_AFTER);
        let late: Vec<String> = failing
            .iter()
            .filter(|(_, (since, _, _))| since.elapsed() > bound)
            .map(|(kind, (since, _, error))| {
                format!(
                    "the {kind} watch failing for {}s ({error})",
                    since.elapsed().as_secs()
                )
            })
            .collect();
        (!late.is_empty()).then(|| format!("{}; enforcement keeps the last known state", late.join(", ")))
    }
}

/// The caches. `triggers` fires after any change to any of them, with what changed.
#[derive(Clone)]
pub struct Caches {
    pub watches: Arc<Watches>,
    /// True once the pod watch's first list was passed on.
    pub pods_listed: tokio::sync::watch::Receiver<bool>,
    pub namespaces: Store<Namespace>,
    /// Spec kept raw: an object that does not deserialize is rejected by the parser, not
    /// by the watch (see `raw_policy`).
    pub policies: Store<RawPolicy>,
    /// DomainPolicies and ClusterDomainPolicies.
    pub domains: super::kube_domains::DomainCache,
    pub cluster_domains: super::kube_domains::DomainCache,
    pub triggers: Arc<Triggers>,
}

impl Caches {
    /// Resolves once every cache has had its initial list.
    pub async fn ready(&self) {
        let mut pods_listed = self.pods_listed.clone();
        let _ = tokio::join!(
            pods_listed.wait_for(|listed| *listed),
            self.namespaces.wait_until_ready(),
            self.policies.wait_until_ready(),
            self.domains.ready(),
            self.cluster_domains.ready(),
        );
    }
}

/// Starts the watches as tasks on the current runtime. `node`: this node's name (its pods'
/// objects are kept whole, for enrichment).
pub fn start(client: Client, triggers: Arc<Triggers>, node: String) -> Caches {
    let watches = Arc::new(Watches::default());
    let pods_listed = watch_pods(
        Api::<Pod>::all(client.clone()),
        node,
        triggers.clone(),
        watches.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        strip_meta,
        namespace_changed,
        triggers.clone(),
        watches.clone(),
    );
    let policies = reflect(
        Api::<RawPolicy>::all(client.clone()),
        strip_meta,
        policy_changed,
        triggers.clone(),
        watches.clone(),
    );
    let (domains, cluster_domains) = super::kube_domains::start(client, triggers.clone(), watches.clone());
    Caches {
        watches,
        pods_listed,
        namespaces,
        policies,
        domains,
        cluster_domains,
        triggers,
    }
}

/// What a changed object asks of the sync loop (the store has it already).
type OnChange<K> = fn(&Triggers, &watcher::Event<K>);

fn namespace_changed(triggers: &Triggers, event: &watcher::Event<Namespace>) {
    match event {
        watcher::Event::Apply(ns) | watcher::Event::Delete(ns) => match &ns.metadata.name {
            Some(name) => triggers.namespace(name.clone()),
            None => triggers.full("Namespace"),
        },
        _ => triggers.full("Namespace"),
    }
}

fn policy_changed(triggers: &Triggers, event: &watcher::Event<RawPolicy>) {
    match event {
        watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
            triggers.policy(p.metadata.namespace.clone().unwrap_or_default())
        }
        _ => triggers.full("NetworkPolicy"),
    }
}

fn reflect<K>(
    api: Api<K>,
    strip: fn(&mut K),
    on_change: OnChange<K>,
    triggers: Arc<Triggers>,
    watches: Arc<Watches>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .modify(strip)
        .reflect(writer);
    tokio::spawn(drive(
        stream,
        move |event| {
            // The store has been updated before the event is yielded.
            if changed_cache(&event) {
                on_change(&triggers, &event);
            }
        },
        watches,
        K::kind(&()).into_owned(),
    ));
    store
}

/// The pod watch: each pod becomes a `PodRecord` at once (the object itself is kept only
/// for this node's pods) and goes to the loop; a relist is passed on whole at its end.
fn watch_pods(
    api: Api<Pod>,
    node: String,
    triggers: Arc<Triggers>,
    watches: Arc<Watches>,
) -> tokio::sync::watch::Receiver<bool> {
    let (listed, pods_listed) = tokio::sync::watch::channel(false);
    let stream = watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
    let mut relist: Option<Vec<(PodKey, PodRecord)>> = None;
    let on_event = move |event: watcher::Event<Pod>| match event {
        watcher::Event::Init => relist = Some(Vec::new()),
        watcher::Event::InitApply(pod) => {
            if let (Some(list), Some((key, record))) = (relist.as_mut(), record(pod, &node)) {
                list.push((key, record));
            }
        }
        watcher::Event::InitDone => {
            triggers.relisted_pods(relist.take().unwrap_or_default());
            listed.send_replace(true);
        }
        watcher::Event::Apply(pod) => {
            if let Some((key, record)) = record(pod, &node) {
                triggers.pod(key, Some(record));
            }
        }
        watcher::Event::Delete(pod) => {
            if let Some(key) = pod_key(&pod) {
                triggers.pod(key, None);
            }
        }
    };
    tokio::spawn(drive(stream, on_event, watches, "Pod".into()));
    pods_listed
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some((
        pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone()?,
    ))
}

/// What the loop keeps of a pod: its peer data, and the slimmed object if it is on `node`.
pub(super) fn record(mut pod: Pod, node: &str) -> Option<(PodKey, PodRecord)> {
    let key = pod_key(&pod)?;
    let peer = super::snapshot::cluster_pod(&pod);
    let local = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
    let uid = pod.metadata.uid.clone();
    let local = local.then(|| {
        strip_pod(&mut pod);
        Arc::new(pod)
    });
    Some((key, PodRecord { uid, peer, local }))
}

async fn drive<S, K>(
    stream: S,
    mut on_event: impl FnMut(watcher::Event<K>),
    watches: Arc<Watches>,
    kind: String,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if api_answered(&event) {
                    watches.succeeded(&kind);
                }
                on_event(event);
            }
            Err(error) => {
                tracing::warn!(%kind, %error, "watch error; retrying with backoff (caches keep their last state)");
                watches.failed(&kind, error.to_string());
            }
        }
    }
}

fn strip_meta<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Keeps labels, annotations, node, container ports, pod IPs and the controlling owner's
/// kind and name: what selection, named ports, enrichment and the workload baseline need;
/// and whether the pod can step around the guard.
fn strip_pod(pod: &mut Pod) {
    // Before anything is slimmed away: init containers count too.
    super::bypass::mark(pod);
    strip_meta(pod);
    // Annotations are the one field a cluster user can make huge (256 KiB each): only the
    // ones enrichment reads, and the agent's own mark, are kept.
    if let Some(annotations) = &mut pod.metadata.annotations {
        annotations.retain(|k, _| crate::events::record::is_ci_key(k) || k == super::bypass::ANNOTATION);
    }
    // Only the controlling owner's kind and name: the workload of a pod without CI labels
    // (`baseline::workload::owner_of`).
    pod.metadata.owner_references = pod.metadata.owner_references.take().and_then(|refs| {
        let owner = refs.into_iter().find(|r| r.controller == Some(true))?;
        Some(vec![OwnerReference {
            kind: owner.kind,
            name: owner.name,
            controller: Some(true),
            ..OwnerReference::default()
        }])
    });
    pod.metadata.finalizers = None;
    if let Some(spec) = &mut pod.spec {
        spec.volumes = None;
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.affinity = None;
        spec.tolerations = None;
        for c in &mut spec.containers {
            c.env = None;
            c.env_from = None;
            c.command = None;
            c.args = None;
            c.volume_mounts = None;
            c.resources = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
        }
    }
    if let Some(status) = &mut pod.status {
        status.conditions = None;
        // Only name and id are kept: enrichment maps container cgroups to names.
        for c in status.container_statuses.iter_mut().flatten() {
            c.state = None;
            c.last_state = None;
            c.image = String::new();
            c.image_id = String::new();
            c.resources = None;
            c.volume_mounts = None;
        }
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}
