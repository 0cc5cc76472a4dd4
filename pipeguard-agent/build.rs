//! Builds the eBPF crate for bpfel-unknown-none and leaves the object in OUT_DIR, where
//! `engine::object` embeds it. `AYA_BUILD_SKIP=1` skips it (for check/clippy without the
//! eBPF toolchain); the engine then refuses to load with a clear error.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "pipeguard-ebpf")
        .ok_or_else(|| anyhow!("pipeguard-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo:rustc-check-cfg=cfg(pipeguard_no_ebpf)");
    if skip {
        println!("cargo:rustc-cfg=pipeguard_no_ebpf");
    }
    aya_build::build_ebpf(
        [Package {
            name: "pipeguard-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
