"""What the data is when a run starts: a fingerprint of every data source, the eval tasks and the lm-eval task files,
taken by the pipeline's first task (never cached) and handed to data-prep as an input, so a compiled pipeline fired on
a schedule retrains when the files under the same names change and takes everything from the cache when they do not.

Local files: sha256 of their bytes. S3: the ETag, size and version id of the object, or of every object under a
prefix. The fingerprint lists the objects it covered; they go into data-prep's lineage and the pipeline's MLflow run.

The base model gets a fingerprint of its own (`models.fingerprint`), handed to data-prep beside the data's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tuneforge import storage
from tuneforge.config import Config
from tuneforge.data import readers
from tuneforge.errors import DataError


def _local(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: data file not found")
    return [{"source": path, "sha256": storage.sha256_file(file), "size": file.stat().st_size}]


def _s3(uri: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    found = storage.objects(uri, endpoint_url)
    if not found:
        raise DataError(f"{uri}: no such object or prefix in S3")
    return [{"source": uri, **item} for item in found]


def lm_eval_files(config: Config) -> list[str]:
    """The lm-eval task files evaluate reads (evaluate.lm_eval.tasks that are YAML files) and the data_files they name,
    which lm-eval reads beside them."""
    files = []
    for task in config.evaluate.lm_eval.tasks:
        if not task.endswith((".yaml", ".yml")):
            continue
        files.append(task)
        try:
            data_files = readers.lm_eval_task(task).get("dataset_kwargs", {}).get("data_files")
        except DataError:
            continue  # fingerprinting the file itself names what is wrong with it
        if isinstance(data_files, dict):
            files += list(data_files.values())
    return files


def data_paths(config: Config) -> list[str]:
    """Every file or S3 URI a run's results depend on besides the base model: the data sources, the eval tasks and the
    lm-eval task files."""
    return ([s.path for s in config.data.sources] + ([config.data.eval_tasks] if config.data.eval_tasks else [])
            + lm_eval_files(config))


def fingerprint(config: Config) -> dict[str, Any]:
    """{"sha256": one digest over every object, "objects": what it covered}."""
    paths = data_paths(config)
    objects: list[dict[str, Any]] = []
    for path in paths:
        if storage.is_s3(path):
            objects += _s3(path, config.storage.endpoint_url)
        elif "://" in path:
            raise DataError(f"{path}: only local files and s3:// URIs are supported as data sources")
        else:
            objects += _local(path)
    digest = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "objects": objects}
