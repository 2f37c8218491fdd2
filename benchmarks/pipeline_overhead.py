"""Pipeline overhead: the wall time of `tuneforge run` minus the stages' own time, and a fully cached rerun.

    python benchmarks/pipeline_overhead.py [--config examples/quickstart.yaml]

Runs the pipeline twice in a fresh workdir: the first run does every stage; the second, with nothing changed,
takes every stage from the cache. A task's time is from kfp.local's "Executing task" to its "finished" line;
it includes the task's process start and imports. The rest of the wall time is the pipeline's own:
compiling, kfp.local's bookkeeping and cache lookups, and passing artifacts between tasks. The table also
shows the Python start and imports inside the tasks (measured as the wall time of a task process that only
imports what the stage imports), which a long-lived worker would not pay.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(config: Path, workdir: Path) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", str(config), "--set", f"workdir={workdir}"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tuneforge run failed:\n{done.stderr[-3000:]}")
    return wall, task_seconds(done.stderr)


def task_seconds(log: str) -> dict[str, float]:
    """Each task's time, from kfp.local's log lines ("HH:MM:SS.mmm - INFO - Executing task 'x'" ... "finished")."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    started, seconds = {}, {}
    for clock, task, event in re.findall(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (?:Executing task|Task) '([^']+)'(.*)$", log, re.M):
        h, m, s = clock.split(":")
        at = int(h) * 3600 + int(m) * 60 + float(s)
        if "finished" in event:
            seconds[task] = at - started[task]
        else:
            started[task] = at
    return seconds


def import_seconds(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))

    first_wall, first = run(args.config, workdir)
    cached_wall, cached = run(args.config, workdir)
    training_imports = import_seconds("tuneforge.components.sft")
    light_imports = import_seconds("tuneforge.components.register")
    print("| task | first run s | cached rerun s |\n|---|---|---|")
    for task in first:
        print(f"| {task} | {first[task]:.1f} | {cached.get(task, 0):.1f} |")
    print(f"\nimports: a training stage {training_imports:.1f} s, an MLflow-only task {light_imports:.1f} s\n")
    print("| run | wall s | tasks s | pipeline overhead s | overhead % |\n|---|---|---|---|---|")
    for name, wall, tasks in (("first", first_wall, first), ("cached rerun", cached_wall, cached)):
        busy = sum(tasks.values())
        print(f"| {name} | {wall:.1f} | {busy:.1f} | {wall - busy:.1f} | {100 * (wall - busy) / wall:.1f}% |")

if __name__ == "__main__":
    main()
