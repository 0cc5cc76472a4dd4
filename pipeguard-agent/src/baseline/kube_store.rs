//! Reading and writing `WorkloadBaseline` objects through the API server. Writes are JSON
//! merge patches of the whole spec (no resourceVersion needed: only this node's agent writes
//! its objects), creating the object when the patch finds none.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use super::object::{BaselineSpec, GROUP, KIND, PLURAL, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("listing {PLURAL}: {0}")]
    List(#[source] kube::Error),
    #[error("writing {PLURAL} {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// One object read back: its namespace and name, and its spec or why it has none.
pub struct Stored {
    pub namespace: String,
    pub name: String,
    pub spec: Result<BaselineSpec, String>,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    resource: ApiResource,
}

impl Store {
    pub fn new(client: Client) -> Self {
        let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
        Self {
            client,
            resource: ApiResource::from_gvk_with_plural(&gvk, PLURAL),
        }
    }

    /// Every object of `namespace` (all namespaces with `None`), paginated.
    pub async fn list(&self, namespace: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &self.resource),
            None => Api::all_with(self.client.clone(), &self.resource),
        };
        let mut out = Vec::new();
        let mut params = ListParams::default().limit(100);
        loop {
            let page = api.list(&params).await.map_err(StoreError::List)?;
            for obj in page.items {
                let namespace = obj.metadata.namespace.clone().unwrap_or_default();
                let name = obj.metadata.name.clone().unwrap_or_default();
                // A bad object is reported by name and skipped, never fatal.
                let spec = obj
                    .data
                    .get("spec")
                    .cloned()
                    .ok_or_else(|| "no spec".to_string())
                    .and_then(|s| serde_json::from_value(s).map_err(|e| format!("spec: {e}")));
                out.push(Stored {
                    namespace,
                    name,
                    spec,
                });
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    /// Writes `spec` as object `name` in `namespace`.
    pub async fn write(&self, namespace: &str, name: &str, spec: &BaselineSpec) -> Result<(), StoreError> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &self.resource);
        let err = |source| StoreError::Write {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        let patch = json!({ "spec": spec });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let obj: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": format!("{GROUP}/{VERSION}"),
                    "kind": KIND,
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"pipeguard.dev/node": label_value(&spec.node)}},
                    "spec": spec,
                }))
                .expect("a well-formed object");
                api.create(&PostParams::default(), &obj)
                    .await
                    .map(|_| ())
                    .map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }
}

/// A node name as a label value (at most 63 characters).
fn label_value(node: &str) -> String {
    node.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.', '_'])
        .to_string()
}
