//! Sets up the eBPF toolchain the way ../shared/TOOLCHAIN.md proved it: rust-src for the
//! nightly, and bpf-linker built against the nightly's own libLLVM (Debian's LLVM is too old
//! and no prebuilt bpf-linker can be downloaded here).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the eBPF build needs, once set up.
pub struct Toolchain {
    pub bpf_linker: PathBuf,
}

impl Toolchain {
    /// Environment for any cargo invocation that builds the agent (its build.rs builds the
    /// eBPF crate): pick our linker explicitly, never by PATH order.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &self.bpf_linker);
    }
}

/// Idempotent: cheap when everything is already in place.
pub fn setup() -> Result<Toolchain> {
    ensure_rust_src()?;
    let sysroot = nightly_sysroot()?;
    let llvm_lib = find_libllvm(&sysroot)?;
    let llvm_major = nightly_llvm_major()?;
    let bpf_linker = cargo_home().join("bin").join("bpf-linker");
    if linker_is_current(&bpf_linker, &llvm_lib)? {
        return Ok(Toolchain { bpf_linker });
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about 80 s, once)",
        llvm_lib.display()
    );
    build_bpf_linker(&sysroot, &llvm_lib, llvm_major)?;
    if !linker_is_current(&bpf_linker, &llvm_lib)? {
        bail!("bpf-linker was built but is not bound to {}", llvm_lib.display());
    }
    Ok(Toolchain { bpf_linker })
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn ensure_rust_src() -> Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
            .context(
            "the nightly toolchain is needed to build eBPF programs (rustup toolchain install nightly)",
        )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()?;
    if !status.success() {
        bail!("rustup component add rust-src --toolchain nightly failed");
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly_llvm_major() -> Result<u32> {
    let out = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV printed no LLVM version")?;
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("unexpected LLVM version {version:?}"))
}

fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("libLLVM.so") || name.starts_with("libLLVM-") {
            return Ok(path);
        }
    }
    bail!("the nightly toolchain at {} ships no libLLVM", sysroot.display())
}

/// Current when it reports the pinned version and is linked to this nightly's libLLVM.
fn linker_is_current(bpf_linker: &Path, llvm_lib: &Path) -> Result<bool> {
    if !bpf_linker.exists() {
        return Ok(false);
    }
    let Ok(version) = output(Command::new(bpf_linker).arg("--version")) else {
        return Ok(false);
    };
    if !version.contains(BPF_LINKER_VERSION) {
        return Ok(false);
    }
    let ldd = output(Command::new("ldd").arg(bpf_linker))?;
    Ok(ldd.contains(&*llvm_lib.to_string_lossy()))
}

fn build_bpf_linker(sysroot: &Path, llvm_lib: &Path, llvm_major: u32) -> Result<()> {
    // llvm-sys links `-lLLVM`; the toolchain names its library with a version suffix.
    let link_dir = env::temp_dir().join(format!("pipeguard-libllvm-{}", std::process::id()));
    std::fs::create_dir_all(&link_dir)?;
    let link = link_dir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(llvm_lib, &link)?;
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm_major}"))
        .env("RUSTFLAGS", format!("-L native={}", link_dir.display()))
        .env("LLVM_PREFIX", sysroot)
        .status()
        .context("running cargo install bpf-linker")?;
    let _ = std::fs::remove_dir_all(&link_dir);
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}
