//! inotify on the kubelet cgroup tree: a new pod cgroup triggers a sync within milliseconds
//! of its mkdir. Watched: the cgroup root (for kubepods to appear), the kubepods cgroups and
//! their QoS children. A new or removed pod cgroup is passed on by itself (the loop writes
//! or deletes only its entry); anything else (kubepods or a QoS cgroup appearing, lost
//! events) makes the loop re-scan the tree.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use super::{
    pod_cgroups::{KUBEPODS, PodCgroup, is_qos_dir, pod_uid},
    triggers::Triggers,
};
use futures::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask};

/// Depth below the root: 0 root, 1 kubepods, 2 QoS class.
type Depth = u8;

pub fn start(root: PathBuf, triggers: Arc<Triggers>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let inotify = Inotify::init()?;
    let mut stream = inotify.into_event_stream([0u8; 4096])?;
    let mut watches = stream.watches();
    let mask = WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR;
    let mut dirs: HashMap<WatchDescriptor, (PathBuf, Depth)> = HashMap::new();
    let mut add =
        move |path: PathBuf, depth: Depth, dirs: &mut HashMap<WatchDescriptor, (PathBuf, Depth)>| {
            match watches.add(&path, mask) {
                Ok(wd) => {
                    dirs.insert(wd, (path, depth));
                }
                Err(error) => tracing::warn!(path = %path.display(), %error, "cannot watch cgroup directory"),
            }
        };
    add(root.clone(), 0, &mut dirs);
    for kubepods in KUBEPODS.iter().map(|k| root.join(k)).filter(|p| p.is_dir()) {
        add(kubepods.clone(), 1, &mut dirs);
        for qos in std::fs::read_dir(&kubepods)?.flatten() {
            if is_qos_dir(&qos.file_name().to_string_lossy()) {
                add(qos.path(), 2, &mut dirs);
            }
        }
    }
    Ok(tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(e) => e,
                Err(error) => {
                    tracing::warn!(%error, "inotify read failed; relying on periodic rescans");
                    continue;
                }
            };
            if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                triggers.full("cgroups_changed");
                continue;
            }
            let Some(name) = event.name.as_ref().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let Some((dir, depth)) = dirs.get(&event.wd).cloned() else {
                continue;
            };
            let created = event.mask.contains(inotify::EventMask::CREATE);
            let path = dir.join(&name);
            match depth {
                0 if created && KUBEPODS.contains(&name.as_str()) => add(path.clone(), 1, &mut dirs),
                1 if created && is_qos_dir(&name) => add(path.clone(), 2, &mut dirs),
                _ => {}
            }
            match pod_uid(&name) {
                // Pod cgroups live in kubepods or a QoS cgroup (what the scan finds).
                Some(uid) if created && depth >= 1 => triggers.created(PodCgroup { uid, path }),
                Some(uid) if depth >= 1 => triggers.removed(PodCgroup { uid, path }),
                Some(_) => triggers.full("cgroups_changed"),
                None if depth < 2 => triggers.full("cgroups_changed"),
                None => {}
            }
        }
    }))
}
