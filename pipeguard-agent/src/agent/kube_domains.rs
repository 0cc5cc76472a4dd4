//! Reflectors on the two custom resources, `DomainPolicy` and `ClusterDomainPolicy`
//! (pipeguard.dev/v1alpha1), read as dynamic objects and parsed by the same strict parser
//! as files.
//!
//! A CRD that is not installed (the initial list answers 404) does not hold the agent up:
//! that cache counts as synced and empty, which is safe because domain rules only allow
//! and no object of a kind without its CRD can exist. It is logged, shown in
//! `pipeguard_domain_crd_missing`, and the watcher keeps retrying with backoff, so a CRD
//! installed later is picked up. Any other list error (403: RBAC missing) keeps the cache
//! unsynced, as for the built-in kinds.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use futures::StreamExt;
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tokio::sync::watch;

use super::{
    kube::Watches,
    triggers::Triggers,
    watch_events::{WatchBackoff, api_answered, changed_cache},
};
use crate::policy::{CLUSTER_DOMAIN_POLICY, DOMAIN_POLICY};

/// One custom resource's cache.
#[derive(Clone)]
pub struct DomainCache {
    pub resource: ApiResource,
    pub store: Store<DynamicObject>,
    /// True while the last list attempt answered 404 (the CRD is not installed).
    missing: Arc<AtomicBool>,
    missing_seen: watch::Receiver<bool>,
}

impl DomainCache {
    /// The objects, with apiVersion and kind set (list items may come without them).
    pub fn objects(&self) -> Vec<Arc<DynamicObject>> {
        self.store.state()
    }

    pub fn crd_missing(&self) -> bool {
        self.missing.load(Ordering::Relaxed)
    }

    /// Resolves after the first list, or once the CRD is known to be missing.
    pub async fn ready(&self) {
        let mut missing = self.missing_seen.clone();
        tokio::select! {
            _ = self.store.wait_until_ready() => {}
            _ = missing.wait_for(|m| *m) => {}
        }
    }
}

pub fn resource(kind: &str) -> ApiResource {
    let plural = match kind {
        DOMAIN_POLICY => "domainpolicies",
        _ => "clusterdomainpolicies",
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("pipeguard.dev", "v1alpha1", kind), plural)
}

/// Both caches: (DomainPolicy, ClusterDomainPolicy). Their watch failures count towards
/// readiness like the built-in kinds' (a domain rule revoked while the watch is down stays
/// applied).
pub fn start(client: Client, triggers: Arc<Triggers>, watches: Arc<Watches>) -> (DomainCache, DomainCache) {
    (
        reflect(client.clone(), DOMAIN_POLICY, triggers.clone(), watches.clone()),
        reflect(client, CLUSTER_DOMAIN_POLICY, triggers, watches),
    )
}

fn reflect(
    client: Client,
    kind: &'static str,
    triggers: Arc<Triggers>,
    watches: Arc<Watches>,
) -> DomainCache {
    let resource = resource(kind);
    let api = Api::<DynamicObject>::all_with(client, &resource);
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let missing = Arc::new(AtomicBool::new(false));
    let (missing_tx, missing_seen) = watch::channel(false);
    let stream = watcher(api, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .modify(|obj: &mut DynamicObject| obj.meta_mut().managed_fields = None)
        .reflect(writer);
    let flag = missing.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if !api_answered(&event) {
                        continue;
                    }
                    watches.succeeded(kind);
                    if flag.swap(false, Ordering::Relaxed) {
                        tracing::info!(%kind, "custom resource definition found; watching it");
                    }
                    if changed_cache(&event) {
                        triggers.full(kind);
                    }
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
                    // A kind without its CRD has no objects: nothing is missed.
                    watches.succeeded(kind);
                    if !flag.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%kind, "the CRD is not installed (404); treating it as having no objects and retrying (domain rules only allow, so this opens nothing)");
                        triggers.full(kind);
                    }
                    let _ = missing_tx.send(true);
                }
                Err(error) => {
                    tracing::warn!(%kind, %error, "watch error; retrying with backoff (caches keep their last state)");
                    watches.failed(kind, error.to_string());
                }
            }
        }
    });
    DomainCache {
        resource,
        store,
        missing,
        missing_seen,
    }
}
