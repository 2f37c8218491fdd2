"""Pipeline overhead: the wall time of `tuneforge run` minus the stages' own time, and a fully cached rerun.

    python benchmarks/pipeline_overhead.py [--config examples/quickstart.yaml]

Runs the pipeline twice in a fresh workdir: the first run does every stage; the second, with nothing changed,
takes every stage from the cache. A stage's own time is its MLflow run's start to end (the stage's work:
loading, training, writing, logging); the rest of the wall time is the pipeline's: compiling the pipeline,
kfp.local starting one Python process per task (importing torch, transformers and mlflow), opening and closing
the parent MLflow run, and passing artifacts between tasks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parent.parent


def run(config: Path, workdir: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", str(config), "--set", f"workdir={workdir}"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tuneforge run failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def stage_seconds(summary: dict) -> dict[str, float]:
    """Each stage's own time, from its MLflow run under the pipeline's parent run."""
    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["mlflow"]["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["tuneforge.stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in children}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))

    first_wall, first = run(args.config, workdir)
    stages = stage_seconds(first)
    cached_wall, cached = run(args.config, workdir)
    cached_stages = stage_seconds(cached)
    own = sum(stages.values())
    print("| stage | own s |\n|---|---|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"\n| run | wall s | stages' own s | overhead s | overhead % |\n|---|---|---|---|---|")
    print(f"| first | {first_wall:.1f} | {own:.1f} | {first_wall - own:.1f} | {100 * (first_wall - own) / first_wall:.1f}% |")
    cached_own = sum(cached_stages.values())
    print(f"| cached rerun | {cached_wall:.1f} | {cached_own:.1f} ({', '.join(sorted(cached_stages)) or 'none'}) "
          f"| {cached_wall - cached_own:.1f} | {100 * (cached_wall - cached_own) / cached_wall:.1f}% |")


if __name__ == "__main__":
    main()
