"""Stage outputs that are complete or absent: staged in a sibling folder, a manifest with checksums
written last, then renamed into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class IncompleteOutputError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `output`, on any failure it is deleted.

    The caller writes the manifest last (`write_manifest`); a folder without one is never complete.
    """
    output = Path(output).resolve()
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if not (staging / MANIFEST).exists():
            raise IncompleteOutputError(f"{output}: stage finished without writing its manifest")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def write_manifest(folder: Path, stage: str, lineage: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(folder))] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "stage": stage,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lineage": lineage,
        "metrics": metrics,
        "files": files,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path, stage: str | tuple[str, ...] | None = None, verify: bool = False) -> dict[str, Any]:
    """Read a complete stage output; raise a clear error when it is missing, partial or of another stage."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise IncompleteOutputError(
            f"{folder}: not a complete tuneforge stage output (no {MANIFEST}); rerun the stage that produces it"
        )
    manifest = json.loads(path.read_text())
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest["stage"] not in stages:
        raise IncompleteOutputError(
            f"{folder}: is the output of stage {manifest['stage']!r}, expected {' or '.join(stages)}"
        )
    if verify:
        for name, entry in manifest["files"].items():
            file = folder / name
            if not file.exists() or sha256_file(file) != entry["sha256"]:
                raise IncompleteOutputError(f"{file}: missing or checksum mismatch against {path}")
    return manifest
