//! Pods that can bypass a node-level guard: a privileged container, or one that adds
//! CAP_NET_ADMIN, CAP_SYS_ADMIN or CAP_BPF (TUN injection, leaving its cgroup, detaching
//! the programs), or a pod sharing the host's PID namespace (ptrace into host processes).
//! hostNetwork alone is no escape: the hooks follow the cgroup, not the network namespace.
//!
//! Judged when the pod enters the cache, before its spec is slimmed (init containers count
//! too and are not kept), and carried in the cached object as an annotation only the agent
//! writes: whatever the pod itself put under that key is replaced.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::desired::{DesiredPod, Status};

/// The annotation on cached pods (never written to the API server) holding why the pod is
/// escape capable.
pub const ANNOTATION: &str = "pipeguard.internal/escape-capable";

/// Capabilities whose addition lets a container step around the guard.
const ESCAPE_CAPS: [&str; 3] = ["NET_ADMIN", "SYS_ADMIN", "BPF"];

/// Why `pod` can step around the guard, or `None`.
pub fn reason(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let mut reasons = Vec::new();
    if spec.host_pid == Some(true) {
        reasons.push("hostPID".to_string());
    }
    let containers = spec.init_containers.iter().flatten().chain(&spec.containers);
    for container in containers {
        reasons.extend(container_reason(container));
    }
    for container in spec.ephemeral_containers.iter().flatten() {
        let sc = container.security_context.as_ref();
        if sc.and_then(|s| s.privileged) == Some(true) {
            reasons.push(format!("ephemeral container {:?} is privileged", container.name));
        }
    }
    if reasons.is_empty() {
        return None;
    }
    if spec.host_network == Some(true) {
        reasons.push("with hostNetwork".into());
    }
    Some(reasons.join(", "))
}

fn container_reason(container: &Container) -> Option<String> {
    let sc = container.security_context.as_ref()?;
    if sc.privileged == Some(true) {
        return Some(format!("container {:?} is privileged", container.name));
    }
    let added: Vec<String> = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase())
        .filter(|c| ESCAPE_CAPS.contains(&c.as_str()) || c == "ALL")
        .collect();
    (!added.is_empty()).then(|| {
        format!(
            "container {:?} adds {}",
            container.name,
            added
                .iter()
                .map(|c| format!("CAP_{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Writes (or clears) the escape annotation on a pod entering the cache.
pub fn mark(pod: &mut Pod) {
    let reason = reason(pod);
    let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
    annotations.remove(ANNOTATION);
    if let Some(reason) = reason {
        annotations.insert(ANNOTATION.into(), reason);
    }
}

/// The reason `mark` recorded on a cached pod.
pub fn marked(pod: &Pod) -> Option<String> {
    pod.metadata.annotations.as_ref()?.get(ANNOTATION).cloned()
}

/// Guarded pods that can step around the guard: logged and posted on the pod when first
/// seen (`seen` holds their UIDs between syncs); returns one /readyz line per such pod.
pub fn report(
    desired: &[DesiredPod],
    seen: &mut HashSet<String>,
    client: Option<&kube::Client>,
    node: &str,
) -> Vec<String> {
    let mut notes = Vec::new();
    let mut present = HashSet::new();
    for d in desired {
        let Some(reason) = &d.pod.escape else { continue };
        if d.status == Status::NotGuarded {
            continue;
        }
        let refused = matches!(d.status, Status::RefusedPrivileged { .. });
        present.insert(d.pod.uid.clone());
        if seen.insert(d.pod.uid.clone()) {
            tracing::warn!(namespace = %d.pod.namespace, pod = %d.pod.name, %reason, refused, "guarded pod can step around the guard");
            if let Some(client) = client {
                crate::events::kube_events::post_escape_capable(
                    client.clone(),
                    &d.pod,
                    reason,
                    refused,
                    node,
                );
            }
        }
        notes.push(format!(
            "escape-capable pod {}/{}: {}; {}",
            d.pod.namespace,
            d.pod.name,
            crate::escape::printable(reason),
            if refused {
                "all its egress is denied (--refuse-privileged)"
            } else {
                "reported only (--refuse-privileged denies its egress)"
            }
        ));
    }
    seen.retain(|uid| present.contains(uid));
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn privileged_added_capabilities_and_host_pid_are_escape_capable() {
        let privileged = pod(serde_json::json!({"containers": [
            {"name": "dind", "securityContext": {"privileged": true}}]}));
        assert_eq!(
            reason(&privileged).as_deref(),
            Some("container \"dind\" is privileged")
        );
        let caps = pod(serde_json::json!({"hostNetwork": true, "containers": [
            {"name": "a", "securityContext": {"capabilities": {"add": ["CHOWN", "NET_ADMIN", "CAP_BPF"]}}}]}));
        assert_eq!(
            reason(&caps).as_deref(),
            Some("container \"a\" adds CAP_NET_ADMIN, CAP_BPF, with hostNetwork")
        );
        let init = pod(serde_json::json!({"containers": [{"name": "a"}],
            "initContainers": [{"name": "setup", "securityContext": {"capabilities": {"add": ["ALL"]}}}]}));
        assert_eq!(reason(&init).as_deref(), Some("container \"setup\" adds CAP_ALL"));
        let host_pid = pod(serde_json::json!({"hostPID": true, "containers": [{"name": "a"}]}));
        assert_eq!(reason(&host_pid).as_deref(), Some("hostPID"));
    }

    #[test]
    fn ordinary_pods_and_host_network_alone_are_not() {
        for spec in [
            serde_json::json!({"containers": [{"name": "a"}]}),
            serde_json::json!({"hostNetwork": true, "containers": [{"name": "a",
                "securityContext": {"privileged": false, "capabilities": {"add": ["NET_BIND_SERVICE"]}}}]}),
        ] {
            assert_eq!(reason(&pod(spec)), None);
        }
    }

    #[test]
    fn the_annotation_is_the_agents_own() {
        let mut forged: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": {ANNOTATION: "forged"}},
            "spec": {"containers": [{"name": "a"}]}}))
        .unwrap();
        mark(&mut forged);
        assert_eq!(marked(&forged), None, "a pod cannot set the mark itself");
        let mut real =
            pod(serde_json::json!({"containers": [{"name": "a", "securityContext": {"privileged": true}}]}));
        mark(&mut real);
        assert_eq!(marked(&real).as_deref(), Some("container \"a\" is privileged"));
    }
}
