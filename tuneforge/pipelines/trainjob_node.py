"""The node's side of a Kubeflow Trainer job (trainjob.py creates the job): every process of every node runs
`torchrun -m tuneforge.pipelines.trainjob_node STAGE`, fetches the stage's inputs once per node, and trains as the
pipeline task would; the main process publishes the output."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tuneforge import env, storage
from tuneforge.config import Config
from tuneforge.pipelines.stage_runner import run_stage
from tuneforge.training import main_process_first


def main(stage: str) -> None:
    config_json = os.environ[env.CONFIG_JSON]
    config = Config.model_validate_json(config_json)
    work = Path(os.environ.get(env.JOB_DIR, "/workspace/job"))
    inputs: dict[str, str] = {}
    with main_process_first():  # one download per node; the node's other processes find it done
        for name, uri in json.loads(os.environ[env.INPUTS]).items():
            local = work / "inputs" / name
            if not (local / storage.MANIFEST).exists():
                storage.fetch(uri, local, config.storage.endpoint_url)
            inputs[name] = str(local)
    result = run_stage(stage, config_json, inputs, str(work / stage), parent_run=os.environ[env.PARENT_RUN_ID])
    print(json.dumps(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1])
