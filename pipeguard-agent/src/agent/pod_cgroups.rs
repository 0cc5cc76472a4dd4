//! Where kubelet puts pod cgroups, for both cgroup drivers:
//!
//! - cgroupfs: `kubepods/pod<UID>/`, `kubepods/burstable/pod<UID>/`, `kubepods/besteffort/pod<UID>/`
//! - systemd: `kubepods.slice/kubepods-pod<UID_>.slice/`,
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice/`, and besteffort,
//!   where UID_ is the UID with `-` replaced by `_`.
//!
//! Containers are subdirectories of the pod cgroup; the programs find the pod cgroup as the
//! container cgroup's ancestor, so a pod entry covers every container.

use std::{
    io,
    path::{Path, PathBuf},
};

/// The top-level kubepods cgroups under a cgroup root (either driver, or both).
pub const KUBEPODS: [&str; 2] = ["kubepods", "kubepods.slice"];

/// QoS class cgroups: children of a kubepods cgroup that hold pods.
const QOS: [&str; 4] = [
    "burstable",
    "besteffort",
    "kubepods-burstable.slice",
    "kubepods-besteffort.slice",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    pub path: PathBuf,
}

/// The pod UID a cgroup directory name stands for, if it is a pod cgroup.
pub fn pod_uid(dir_name: &str) -> Option<String> {
    if let Some(uid) = dir_name.strip_prefix("pod") {
        return is_uid(uid).then(|| uid.to_string());
    }
    let inner = dir_name.strip_prefix("kubepods-")?.strip_suffix(".slice")?;
    let (qos, uid) = inner.rsplit_once("pod")?;
    if !matches!(qos, "" | "burstable-" | "besteffort-") {
        return None;
    }
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn is_uid(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

pub fn is_qos_dir(dir_name: &str) -> bool {
    QOS.contains(&dir_name)
}

/// The kubepods cgroups that exist under `root`.
pub fn kubepods_roots(root: &Path) -> Vec<PathBuf> {
    KUBEPODS
        .iter()
        .map(|k| root.join(k))
        .filter(|p| p.is_dir())
        .collect()
}

/// Every pod cgroup under `root`, in both layouts, sorted by path (so two scans compare
/// equal whatever order the directories list in).
pub fn scan(root: &Path) -> io::Result<Vec<PodCgroup>> {
    let mut pods = Vec::new();
    for kubepods in kubepods_roots(root) {
        scan_dir(&kubepods, true, &mut pods)?;
    }
    pods.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(pods)
}

fn scan_dir(dir: &Path, descend_qos: bool, pods: &mut Vec<PodCgroup>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // A QoS cgroup removed while we scan: nothing in it to find.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !descend_qos => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        match entry.file_type() {
            Ok(t) if t.is_dir() => {}
            Ok(_) => continue,
            // Removed between the listing and the look (a pod going away).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(uid) = pod_uid(&name) {
            pods.push(PodCgroup {
                uid,
                path: entry.path(),
            });
        } else if descend_qos && is_qos_dir(&name) {
            scan_dir(&entry.path(), false, pods)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7";

    #[test]
    fn recognizes_both_drivers_and_every_qos_class() {
        let u = UID.replace('-', "_");
        for name in [
            format!("pod{UID}"),
            format!("kubepods-pod{u}.slice"),
            format!("kubepods-burstable-pod{u}.slice"),
            format!("kubepods-besteffort-pod{u}.slice"),
        ] {
            assert_eq!(pod_uid(&name).as_deref(), Some(UID), "{name}");
        }
    }

    #[test]
    fn rejects_containers_qos_and_lookalikes() {
        for name in [
            "burstable",
            "kubepods-burstable.slice",
            "cri-containerd-0123456789abcdef.scope",
            "crio-0123.scope",
            "pod1234",
            "kubepods-guaranteed-pod0d1f2a3b_4c5d_6e7f_8091_a2b3c4d5e6f7.slice",
            "podzzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
        ] {
            assert_eq!(pod_uid(name), None, "{name}");
        }
    }

    #[test]
    fn scans_a_tree_in_both_layouts() {
        let root = std::env::temp_dir().join(format!("pg-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let u = UID.replace('-', "_");
        let other = "11111111-2222-3333-4444-555555555555";
        for dir in [
            format!("kubepods/burstable/pod{UID}/cri-containerd-abc.scope"),
            format!("kubepods/pod{other}"),
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-1.scope"),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mut found: Vec<_> = scan(&root).unwrap().into_iter().map(|p| p.uid).collect();
        found.sort();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(found, vec![UID.to_string(), UID.to_string(), other.to_string()]);
    }
}
