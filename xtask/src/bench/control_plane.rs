//! The control-plane benchmark: pipeguard-agent/benches/control_plane.rs, which links the
//! library (this crate must build without the eBPF toolchain), run through `cargo bench`.

use std::{path::Path, process::Stdio};

use anyhow::{Context, Result, bail};

fn cargo_bench(extra: &[&str]) -> Result<std::process::Command> {
    let tc = crate::toolchain::setup()?;
    let mut args = vec![
        "bench",
        "--package",
        "pipeguard-agent",
        "--bench",
        "control_plane",
    ];
    args.extend_from_slice(extra);
    Ok(crate::cargo(&tc, &args))
}

pub fn build() -> Result<()> {
    crate::status(cargo_bench(&["--no-run"])?)
}

/// Runs it (`only`: one of its sections); returns its Markdown tables and its JSON document.
pub fn run(quick: bool, dir: &Path, only: Option<&str>) -> Result<(String, String)> {
    let json = dir.join("control_plane.json");
    let mut cmd = cargo_bench(&["--", "--json"])?;
    cmd.arg(&json);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(section) = only {
        cmd.args(["--only", section]);
    }
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("running the control-plane bench")?;
    if !out.status.success() {
        bail!("the control-plane bench failed with {}", out.status);
    }
    let doc = std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), doc))
}
