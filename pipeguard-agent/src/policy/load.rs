//! Policy files and directories → validated policies, collecting one error per bad object
//! so the rest of the set still compiles.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use super::{
    domain_load::{DomainFailure, DomainTaint, domain_policy_from_value, is_domain_kind},
    domain_policy::DomainPolicy,
    error::PolicyError,
    model::NetworkPolicyDoc,
    validate::{Policy, validate},
    yaml_stream,
};

/// Larger files are refused whole: a policy file is never legitimately this big, and
/// parsing must not be a way to exhaust the agent's memory.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, Default)]
pub struct PolicySet {
    /// Shared: the agent keeps each parsed object across syncs and builds a new set per
    /// change without copying every policy (5,000 at scale).
    pub policies: Vec<Arc<Policy>>,
    /// DomainPolicies and ClusterDomainPolicies (their errors are in `errors` too).
    pub domains: Vec<DomainPolicy>,
    pub errors: Vec<PolicyError>,
    /// Who fails closed because of each invalid domain policy.
    pub domain_taints: Vec<DomainTaint>,
}

impl PolicySet {
    fn add_policy(&mut self, result: Result<Policy, PolicyError>) {
        match result {
            Ok(policy) => self.policies.push(Arc::new(policy)),
            Err(error) => self.errors.push(error),
        }
    }

    pub fn add_domain(&mut self, result: Result<DomainPolicy, DomainFailure>) {
        match result {
            Ok(policy) => self.domains.push(policy),
            Err(failure) => {
                self.errors.push(failure.error);
                self.domain_taints.push(failure.taint);
            }
        }
    }

    /// Every warning of every policy, NetworkPolicies first.
    pub fn warnings(&self) -> impl Iterator<Item = &String> {
        self.policies
            .iter()
            .flat_map(|p| &p.warnings)
            .chain(self.domains.iter().flat_map(|d| &d.warnings))
    }
}

/// Every path is a YAML file (several `---` documents allowed) or a directory whose
/// `*.yaml`/`*.yml` files are read recursively, in sorted order.
pub fn load_policies(paths: &[PathBuf]) -> PolicySet {
    let mut set = PolicySet::default();
    for path in paths {
        let mut files = Vec::new();
        if let Err(e) = collect_files(path, &mut files) {
            set.errors
                .push(PolicyError::file(&path.display().to_string(), e.to_string()));
            continue;
        }
        for file in files {
            let label = file.display().to_string();
            match read_limited(&file, MAX_FILE_BYTES) {
                Ok(text) => {
                    let parsed = parse_policies(&label, &text);
                    set.policies.extend(parsed.policies);
                    set.domains.extend(parsed.domains);
                    set.errors.extend(parsed.errors);
                    set.domain_taints.extend(parsed.domain_taints);
                }
                Err(message) => set.errors.push(PolicyError::file(&label, message)),
            }
        }
    }
    set
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, files)?;
        } else if entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(entry);
        }
    }
    Ok(())
}

pub(super) fn read_limited(path: &Path, limit: u64) -> Result<String, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > limit {
        return Err(format!("file is {size} bytes; the limit is {limit}"));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// Parses YAML text from `source` (a file name or another label).
///
/// A NetworkPolicy document is deserialized straight into its typed form by a streaming
/// parser: a value tree of a 100k-CIDR policy is ten times the policy, and serde_yaml's
/// buffer of a document's events five times, and either set the peak of `exec` and
/// `check`. One that deserializes takes that one pass, valid or not; one that does not is
/// read again, its kind and name first, so that its error names the object. Lists, domain kinds and documents the
/// streaming parser cannot read take serde_yaml's value-tree path.
pub fn parse_policies(source: &str, text: &str) -> PolicySet {
    let mut set = PolicySet::default();
    let many = text.lines().any(|l| l.trim_end() == "---");
    for (i, document) in yaml_stream::documents(text).into_iter().enumerate() {
        let doc_no = many.then_some(i + 1);
        let numbered = |error: PolicyError| PolicyError {
            document: doc_no,
            ..error
        };
        if let Some(result) = one_pass_policy(source, document) {
            set.add_policy(result.map_err(numbered));
            continue;
        }
        match document_head(document) {
            Some(None) => continue,
            Some(Some(head)) if head.kind == "NetworkPolicy" => {
                set.add_policy(streamed_policy(source, document, head).map_err(numbered));
                continue;
            }
            _ => {}
        }
        let value: serde_yaml::Value = match serde_yaml::from_str(document) {
            Ok(v) => v,
            Err(e) => {
                set.errors
                    .push(numbered(PolicyError::file(source, format!("YAML: {e}"))));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        for object in list_items(value) {
            let kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
            if is_domain_kind(kind) {
                set.add_domain(domain_policy_from_value(source, object).map_err(|mut failure| {
                    failure.error.document = doc_no;
                    failure
                }));
                continue;
            }
            set.add_policy(policy_from_value(source, object).map_err(numbered));
        }
    }
    set
}

/// What an object is, read without building it (serde skips every other field).
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: HeadMeta,
}

#[derive(Default, Deserialize)]
struct HeadMeta {
    name: Option<String>,
    namespace: Option<String>,
}

/// A NetworkPolicy document deserialized in one streaming pass, then validated; `None` for
/// another kind or a document that does not deserialize (the passes below then name the
/// object and field of the fault).
fn one_pass_policy(source: &str, document: &str) -> Option<Result<Policy, PolicyError>> {
    let doc: NetworkPolicyDoc = serde_saphyr::from_str_with_options(document, streaming_options()).ok()?;
    if doc.kind != "NetworkPolicy" {
        return None;
    }
    let namespace = doc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = doc.metadata.name.clone();
    let object = object_label(&doc.kind, &namespace, name.as_deref());
    Some(with_source(
        source,
        namespace.clone(),
        finish(doc, namespace, name, object),
    ))
}

/// The document's head (`Some(None)`: an empty document), or `None` when this cannot read
/// it (a syntax error, a scalar, a name that is not a string): the value-tree path then
/// reads, and reports, it. serde_yaml reads what the streaming parser's budget refuses (an
/// alias bomb in a field the head skips), so that the typed pass can name the field.
fn document_head(document: &str) -> Option<Option<Head>> {
    serde_saphyr::from_str_with_options(document, streaming_options())
        .ok()
        .or_else(|| serde_yaml::from_str(document).ok())
}

/// One NetworkPolicy document, streamed into its typed form.
fn streamed_policy(source: &str, document: &str, head: Head) -> Result<Policy, PolicyError> {
    // Kept outside: after a field error the parser reports the unread rest of the document
    // too, which would hide the error that names the field.
    let mut typed = None;
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(document, streaming_options(), |de| {
        typed = Some(typed_policy(source, de, head));
        Ok(())
    });
    typed.unwrap_or_else(|| {
        let e = parsed.err().map_or("not read".to_string(), |e| e.to_string());
        Err(PolicyError::file(source, format!("YAML: {e}")))
    })
}

/// Limits sized by the file limit rather than the parser's defaults (a million events is
/// less than a 4 MiB policy may hold), and aliases replayed a tenth as often (an alias bomb
/// within the default held ~100 MB); messages without a source snippet, as the other paths
/// write them.
fn streaming_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = MAX_FILE_BYTES as usize;
    budget.max_nodes = MAX_FILE_BYTES as usize;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = 100_000;
    options.with_snippet = false;
    options
}

/// `kubectl get … -o yaml` of several objects writes one `kind: List` (or `…List`) with
/// `items`: each item is read as its own object. Anything else is one object.
pub(super) fn list_items(value: serde_yaml::Value) -> Vec<serde_yaml::Value> {
    let is_list = value
        .get("kind")
        .and_then(|k| k.as_str())
        .is_some_and(|k| k.ends_with("List"));
    match value.get("items") {
        Some(serde_yaml::Value::Sequence(items)) if is_list => items.clone(),
        Some(serde_yaml::Value::Null) if is_list => Vec::new(),
        _ => vec![value],
    }
}

/// One object (from a file, or from the API server), strictly parsed and validated.
pub fn policy_from_value(source: &str, value: serde_yaml::Value) -> Result<Policy, PolicyError> {
    let namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_string();
    with_source(source, namespace, parse_object(value))
}

/// One object as JSON bytes (the agent's path). No intermediate value tree: for a policy of
/// 100k CIDRs that tree is hundreds of MiB of short-lived allocations, which the allocator
/// keeps long after the parse.
pub fn policy_from_json(source: &str, json: &[u8]) -> Result<Policy, PolicyError> {
    let head: Head =
        serde_json::from_slice(json).map_err(|e| PolicyError::file(source, format!("JSON: {e}")))?;
    typed_policy(source, &mut serde_json::Deserializer::from_slice(json), head)
}

/// One object named by its `head`, deserialized from `deserializer` straight into its typed
/// form (no value tree) and validated.
fn typed_policy<'de, D: serde::Deserializer<'de>>(
    source: &str,
    deserializer: D,
    head: Head,
) -> Result<Policy, PolicyError>
where
    D::Error: std::fmt::Display,
{
    let namespace = head.metadata.namespace.unwrap_or_else(|| "default".into());
    let object = object_label(&head.kind, &namespace, head.metadata.name.as_deref());
    let parsed = check_kind(&head.kind, &object).and_then(|()| {
        let doc = deserialize_doc(deserializer, &object)?;
        finish(doc, namespace.clone(), head.metadata.name, object.clone())
    });
    with_source(source, namespace, parsed)
}

/// A policy of `source`, or the error naming its file, object and field.
fn with_source(
    source: &str,
    namespace: String,
    parsed: Result<Policy, ObjectError>,
) -> Result<Policy, PolicyError> {
    let mut policy = parsed.map_err(|(object, field, message)| PolicyError {
        source: source.into(),
        document: None,
        object,
        namespace: Some(namespace),
        field,
        message,
    })?;
    name_warnings(source, &mut policy);
    Ok(policy)
}

fn object_label(kind: &str, namespace: &str, name: Option<&str>) -> Option<String> {
    Some(format!(
        "{} {namespace}/{}",
        if kind.is_empty() {
            "object".to_string()
        } else {
            kind.to_lowercase()
        },
        name.unwrap_or("<no name>")
    ))
}

fn check_kind(kind: &str, object: &Option<String>) -> Result<(), ObjectError> {
    if kind == "NetworkPolicy" {
        return Ok(());
    }
    let message = if kind.is_empty() {
        "missing kind (expected NetworkPolicy, DomainPolicy or ClusterDomainPolicy)".to_string()
    } else {
        format!(
            "unsupported kind {kind:?}: only networking.k8s.io/v1 NetworkPolicy and pipeguard.dev/v1alpha1 DomainPolicy and ClusterDomainPolicy are read"
        )
    };
    Err((object.clone(), Some("kind".into()), message))
}

fn deserialize_doc<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    object: &Option<String>,
) -> Result<NetworkPolicyDoc, ObjectError>
where
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let message = without_repeated_path(e.into_inner().to_string(), &path);
        (object.clone(), (path != ".").then_some(path), message)
    })
}

/// serde_yaml read from the text (not from a value) starts its message with the path to
/// the parent of the field, which the error already names in full: `a.b: unknown field`.
fn without_repeated_path(message: String, path: &str) -> String {
    match message.split_once(": ") {
        Some((head, rest)) if !head.is_empty() && path.starts_with(head) => rest.to_string(),
        _ => message,
    }
}

fn finish(
    doc: NetworkPolicyDoc,
    namespace: String,
    name: Option<String>,
    object: Option<String>,
) -> Result<Policy, ObjectError> {
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err((object, Some("metadata.name".into()), "missing name".into()));
    };
    validate(doc, namespace, name).map_err(|(field, message)| (object, Some(field), message))
}

/// A warning is read far from the file it came from (exec's start banner, check's stderr):
/// it names the file and object the way errors do.
fn name_warnings(source: &str, policy: &mut Policy) {
    let prefix = format!("{source}: networkpolicy {}", policy.key());
    for warning in &mut policy.warnings {
        *warning = format!("{prefix}: {warning}");
    }
}

type ObjectError = (Option<String>, Option<String>, String);

/// Reads the object's identity first, so even a structurally broken object is named.
fn parse_object(value: serde_yaml::Value) -> Result<Policy, ObjectError> {
    let text = |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|s| s.as_str()).map(str::to_string);
    let kind = text(&value, "kind").unwrap_or_default();
    let metadata = value.get("metadata").cloned().unwrap_or_default();
    let name = text(&metadata, "name");
    let namespace = text(&metadata, "namespace").unwrap_or_else(|| "default".into());
    let object = object_label(&kind, &namespace, name.as_deref());
    check_kind(&kind, &object)?;
    let doc = deserialize_doc(value, &object)?;
    finish(doc, namespace, name, object)
}

#[cfg(test)]
mod tests {
    use super::one_pass_policy;

    /// The streaming parser's default budget (250,000 nodes; these are 300,000) would send it
    /// to serde_yaml's value tree, the peak this path exists to avoid.
    #[test]
    fn a_policy_of_60k_ipblocks_takes_the_streaming_path() {
        let mut text = String::from(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: big}\n\
             spec:\n  podSelector: {}\n  egress:\n  - to:\n",
        );
        for i in 0..60_000u32 {
            let [_, a, b, c] = i.to_be_bytes();
            text += &format!("    - ipBlock: {{cidr: 10.{a}.{b}.{c}/32}}\n");
        }
        let policy = one_pass_policy("big.yaml", &text)
            .expect("streamed")
            .expect("valid");
        assert_eq!(policy.name, "big");
    }
}
