//! `cargo xtask image`: an OCI image of the release `pipeguard`, written without a container
//! daemon: one layer with the binary and the shared libraries `ldd` says it loads (no
//! distribution base, nothing else), an image config with OCI labels, and an OCI image
//! layout packed as a tar (what skopeo and podman call an `oci-archive`).
//!
//! Entrypoint `/usr/local/bin/pipeguard` with the default command `agent`, so the image
//! runs `pipeguard agent` by itself, and deploy/daemonset.yaml's `args: [agent]` (which
//! replaces the command, not the entrypoint) runs the same.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const BINARY_IN_IMAGE: &str = "usr/local/bin/pipeguard";
const SOURCE: &str = "https://github.com/pipeguard/pipeguard";

/// What goes into the image and how it is named.
pub struct ImageSpec {
    pub binary: PathBuf,
    /// The tag (`org.opencontainers.image.ref.name` in the layout's index).
    pub tag: String,
    pub version: String,
    pub revision: String,
    /// Seconds since the epoch for every file and the config's `created`: the commit
    /// time, so the same commit gives the same image.
    pub epoch: u64,
}

impl ImageSpec {
    /// The release binary and this checkout's version, commit and commit time.
    pub fn for_checkout(binary: PathBuf, root: &Path) -> Result<Self> {
        let git = |args: &[&str]| -> Result<String> {
            let out = Command::new("git").arg("-C").arg(root).args(args).output()?;
            if !out.status.success() {
                bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let mut revision = git(&["rev-parse", "HEAD"]).context("the image's revision label")?;
        if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
            revision.push_str("-dirty");
        }
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v.parse().context("SOURCE_DATE_EPOCH")?,
            Err(_) => git(&["log", "-1", "--format=%ct"])?
                .parse()
                .context("commit time")?,
        };
        let version = env!("CARGO_PKG_VERSION").to_string();
        Ok(Self {
            binary,
            tag: version.clone(),
            version,
            revision,
            epoch,
        })
    }
}

/// The files of the single layer: path in the image → path on this machine.
fn layer_files(binary: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    files.insert(BINARY_IN_IMAGE.to_string(), binary.to_path_buf());
    for lib in runtime_libraries(binary)? {
        let canonical =
            std::fs::canonicalize(&lib).with_context(|| format!("resolving {}", lib.display()))?;
        // Stored under the path the loader looks for (symlinks followed into a file).
        let inside = lib.to_string_lossy().trim_start_matches('/').to_string();
        files.insert(inside, canonical);
    }
    Ok(files)
}

/// The shared libraries and the dynamic loader the binary needs, from `ldd`. Empty for a
/// static binary; an error for a library `ldd` cannot find.
pub fn runtime_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("not found") {
            bail!("{}: a library it needs is missing: {line}", binary.display());
        }
        if line.contains("statically linked") {
            return Ok(Vec::new());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or the loader
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType, epoch: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(epoch);
    // Paths here are short and ASCII; set_path checks that.
    h.set_path(path).expect("a ustar path");
    h.set_cksum();
    h
}

/// Every parent directory of the files, then the files, in sorted order.
fn layer_tar(files: &BTreeMap<String, PathBuf>, epoch: u64) -> Result<Vec<u8>> {
    let mut dirs: std::collections::BTreeSet<String> = ["tmp/".to_string()].into();
    for inside in files.keys() {
        let mut parts: Vec<&str> = inside.split('/').collect();
        parts.pop();
        for i in 1..=parts.len() {
            dirs.insert(format!("{}/", parts[..i].join("/")));
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let mode = if dir == "tmp/" { 0o1777 } else { 0o755 };
        tar.append(
            &header(dir, 0, mode, tar::EntryType::Directory, epoch),
            std::io::empty(),
        )?;
    }
    for (inside, source) in files {
        let bytes = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        // The host's permissions: the dynamic loader must stay executable.
        let mode = std::fs::metadata(source)?.permissions().mode() & 0o755;
        tar.append(
            &header(inside, bytes.len() as u64, mode, tar::EntryType::Regular, epoch),
            bytes.as_slice(),
        )?;
    }
    Ok(tar.into_inner()?)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
}

fn rfc3339(epoch: u64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let (days, secs) = ((epoch / 86_400) as i64, epoch % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A content-addressed blob: its bytes and descriptor.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        Self { bytes, digest }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// Writes the OCI archive to `out` and returns the manifest digest.
pub fn write(spec: &ImageSpec, out: &Path) -> Result<String> {
    let layer = layer_tar(&layer_files(&spec.binary)?, spec.epoch)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let layer = Blob::new(gzip(&layer)?);
    let created = rfc3339(spec.epoch);
    let labels = json!({
        "org.opencontainers.image.title": "pipeguard",
        "org.opencontainers.image.description": "Kernel-enforced egress control for CI/CD runner pods",
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.version": spec.version,
        "org.opencontainers.image.revision": spec.revision,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.created": created,
    });
    let config = Blob::new(serde_json::to_vec(&json!({
        "created": created,
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY_IN_IMAGE}")],
            "Cmd": ["agent"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
        "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar+gzip")],
        "annotations": labels,
    }))?);
    let mut manifest_descriptor = manifest.descriptor("application/vnd.oci.image.manifest.v1+json");
    manifest_descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": spec.tag});
    manifest_descriptor["platform"] = json!({"architecture": oci_arch(), "os": "linux"});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8]| -> Result<()> {
        let kind = if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        };
        let mode = if path.ends_with('/') { 0o755 } else { 0o644 };
        archive.append(&header(path, bytes.len() as u64, mode, kind, spec.epoch), bytes)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    add("blobs/", &[])?;
    add("blobs/sha256/", &[])?;
    for blob in [&config, &layer, &manifest] {
        let hex = blob.digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), &blob.bytes)?;
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, archive.into_inner()?).with_context(|| format!("writing {}", out.display()))?;
    Ok(manifest.digest)
}

/// `cargo xtask image`: build the release binary, write target/image/pipeguard-VERSION.oci.tar.
pub fn run(root: &Path) -> Result<std::process::ExitCode> {
    let binary = crate::build()?;
    let spec = ImageSpec::for_checkout(binary, root)?;
    let out = root.join(format!("target/image/pipeguard-{}.oci.tar", spec.tag));
    let digest = write(&spec, &out)?;
    println!("image: {} ({digest})", out.display());
    println!("  libraries: {:?}", runtime_libraries(&spec.binary)?);
    println!(
        "  push:      skopeo copy oci-archive:{}:{} docker://REGISTRY/pipeguard:{}",
        out.display(),
        spec.tag,
        spec.tag
    );
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    fn newest_source(dir: &Path) -> std::time::SystemTime {
        let mut newest = std::time::SystemTime::UNIX_EPOCH;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let t = if path.is_dir() {
                newest_source(&path)
            } else {
                entry.metadata().and_then(|m| m.modified()).unwrap_or(newest)
            };
            newest = newest.max(t);
        }
        newest
    }

    /// target/release/pipeguard, built once if it is missing or older than the sources.
    fn release_binary() -> PathBuf {
        let root = root();
        let binary = root.join("target/release/pipeguard");
        let sources = [
            "pipeguard-agent/src",
            "pipeguard-ebpf/src",
            "pipeguard-common/src",
        ]
        .iter()
        .map(|d| newest_source(&root.join(d)))
        .max()
        .unwrap();
        let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
        if built.is_none_or(|t| t < sources) {
            crate::build().expect("building the release binary for the image");
        }
        binary
    }

    fn tool(name: &str) -> Command {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{name} is not installed: run `cargo xtask setup` (it installs skopeo and umoci)"
        );
        Command::new(name)
    }

    fn run(mut cmd: Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The archive as skopeo and umoci (from Debian) read it, and the binary in the
    /// unpacked root filesystem running with only what the image holds (chroot).
    #[test]
    fn the_image_archive_is_valid_oci_and_its_binary_runs_inside_it() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "unpacking the image and chroot need root (cargo xtask test runs as root)"
        );
        tool("skopeo");
        tool("umoci");
        let dir = std::env::temp_dir().join(format!("pg-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = ImageSpec {
            binary: release_binary(),
            tag: "test".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            revision: "0123456789abcdef".into(),
            epoch: 1_764_633_600,
        };
        let archive = dir.join("pipeguard.oci.tar");
        let digest = write(&spec, &archive).unwrap();

        let mut inspect = tool("skopeo");
        inspect
            .arg("inspect")
            .arg(format!("oci-archive:{}:test", archive.display()));
        let info: Value = serde_json::from_str(&run(inspect)).unwrap();
        assert_eq!(info["Digest"], digest, "{info:#}");
        assert_eq!(info["Os"], "linux");
        assert_eq!(info["Architecture"], oci_arch());
        assert_eq!(
            info["Labels"]["org.opencontainers.image.revision"],
            "0123456789abcdef"
        );
        assert_eq!(
            info["Labels"]["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(info["Labels"]["org.opencontainers.image.source"], SOURCE);

        // skopeo copies it to an OCI layout (verifying every digest), umoci unpacks that.
        let layout = dir.join("layout");
        let mut copy = tool("skopeo");
        copy.arg("copy")
            .arg(format!("oci-archive:{}:test", archive.display()))
            .arg(format!("oci:{}:test", layout.display()));
        run(copy);
        let bundle = dir.join("bundle");
        let mut unpack = tool("umoci");
        unpack
            .args(["unpack", "--image"])
            .arg(format!("{}:test", layout.display()))
            .arg(&bundle);
        run(unpack);
        let rootfs = bundle.join("rootfs");
        assert!(
            rootfs.join(BINARY_IN_IMAGE).is_file(),
            "no {BINARY_IN_IMAGE} in the image"
        );
        let runtime: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            runtime["process"]["args"],
            json!([format!("/{BINARY_IN_IMAGE}"), "agent"]),
            "the image runs `pipeguard agent`"
        );

        // Only the image's files: a missing library would make this fail.
        let mut version = Command::new("chroot");
        version
            .arg(&rootfs)
            .arg(format!("/{BINARY_IN_IMAGE}"))
            .arg("--version");
        let out = run(version);
        assert!(
            out.contains(env!("CARGO_PKG_VERSION")),
            "`pipeguard --version` in the image printed {out:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_633_600 + 3_661), "2025-12-02T01:01:01Z");
    }
}
