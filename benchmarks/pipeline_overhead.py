"""Where a pipeline run's time goes: each task's imports and main work, the pipeline's own overhead, and a fully
cached rerun.

    python benchmarks/pipeline_overhead.py [--config examples/quickstart.yaml]
    python benchmarks/pipeline_overhead.py --log RUN_FOLDER/tasks.log     # split a run already made

Runs the pipeline twice in a fresh workdir: the first run does every stage; the second, with nothing changed,
takes every stage from the cache. A task's time is from kfp.local's "Executing task" to its "finished" line, a
fresh Python process each. The first run has Python report its imports (PYTHONPROFILEIMPORTTIME, inherited by every
task's process): a task's import seconds are the sum of its top-level imports, which a long-lived worker would not
pay. The main work comes from the tasks' own lines: the trainer's train_runtime (steps and in-training evaluations),
evaluate's time per model scored, export's per file written and verified, serve-check's per file served and asked.
The rest of the wall time is the pipeline's own: compiling, kfp.local's bookkeeping and cache lookups.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - (?:Executing task|Task) '([^']+)'(.*)$")
EXECUTOR_LINE = re.compile(r"\[KFP Executor \d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d+) \w+\]: (.*)$")
TOP_IMPORT = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$")  # a nested import has spaces before its name
STAGE_OF = re.compile(r"-\d+$")  # kfp names a task again in another branch: export-gguf-2
TRAIN_RUNTIME = re.compile(r"'train_runtime': '?([\d.]+)")
# The lines that open each part of a task's main work, and the line that ends its last part.
PARTS = {
    "evaluate": (re.compile(r"^evaluating the (\w+) model"), re.compile(r"^the \w+ model is the candidate|^Wrote executor")),
    "export-gguf": (re.compile(r"^writing \S+-(\w+)\.gguf$"), re.compile(r"^export-gguf: ")),
    "serve-check": (re.compile(r"^serving \S+-(\w+)\.gguf$"), re.compile(r"^Wrote executor")),
}


def run(config: Path, workdir: Path, imports: bool) -> tuple[float, Path]:
    """One `tuneforge run`; its wall time and its tasks' log."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"} if imports else None
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", str(config), "--set", f"workdir={workdir}"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"tuneforge run failed:\n{done.stderr[-3000:]}")
    return wall, Path(json.loads(done.stdout.strip().splitlines()[-1])["log"])


def _seconds(h: str, m: str, s: str) -> float:
    return int(h) * 3600 + int(m) * 60 + float(s)


def split(log: str) -> dict[str, dict]:
    """Each task's seconds, import seconds (None when the run did not report them) and main work, from a run's log."""
    tasks: dict[str, dict] = {}
    current = None
    for raw in log.splitlines():
        line = ANSI.sub("", raw)
        if found := TASK_LINE.match(line):
            task, at = found[4], _seconds(*found.groups()[:3])
            if "finished" in found[5]:
                tasks[task]["seconds"] = at - tasks[task]["started"]
                current = None
            elif task not in tasks or "seconds" not in tasks[task]:
                tasks[task] = {"started": at, "imports": None, "parts": {}, "open": None,
                               "markers": PARTS.get(STAGE_OF.sub("", task))}
                current = task
            continue
        if current is None:
            continue
        entry = tasks[current]
        if found := TOP_IMPORT.search(line):
            entry["imports"] = (entry["imports"] or 0.0) + int(found[1]) / 1e6
        elif found := TRAIN_RUNTIME.search(line):
            entry["parts"]["train_runtime"] = float(found[1])
        elif entry["markers"] and (found := EXECUTOR_LINE.search(line)):
            at, message = _seconds(found[1], found[2], f"{found[3]}.{found[4]}"), found[5]
            opens, closes = entry["markers"]
            if entry["open"] and (opens.match(message) or closes.match(message)):
                name, since = entry["open"]
                entry["parts"][name] = at - since
                entry["open"] = None
            if part := opens.match(message):
                entry["open"] = (part[1], at)
    return {task: {k: v for k, v in entry.items() if k in ("seconds", "imports", "parts")}
            for task, entry in tasks.items() if "seconds" in entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    parser.add_argument("--log", type=Path, help="split this run's tasks.log instead of running the pipeline")
    args = parser.parse_args()
    if args.log:
        first_wall, first, cached_wall, cached = None, split(args.log.read_text()), None, {}
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
        first_wall, first_log = run(args.config, workdir, imports=True)
        cached_wall, cached_log = run(args.config, workdir, imports=False)
        first, cached = split(first_log.read_text()), split(cached_log.read_text())

    print("| task | first run s | imports s | main work s | cached rerun s |\n|---|---|---|---|---|")
    for task, entry in first.items():
        imports = f"{entry['imports']:.1f}" if entry["imports"] is not None else "-"
        work = ", ".join(f"{name} {s:.1f}" for name, s in entry["parts"].items()) or "-"
        rerun = f"{cached[task]['seconds']:.1f}" if task in cached else "-"
        print(f"| {task} | {entry['seconds']:.1f} | {imports} | {work} | {rerun} |")
    busy = sum(e["seconds"] for e in first.values())
    imported = sum(e["imports"] or 0 for e in first.values())
    print(f"\ntasks {busy:.1f} s, of which imports {imported:.1f} s ({100 * imported / busy:.0f}%)")
    if first_wall is None:
        return
    print("\n| run | wall s | tasks s | pipeline overhead s | overhead % |\n|---|---|---|---|---|")
    for name, wall, tasks in (("first", first_wall, first), ("cached rerun", cached_wall, cached)):
        busy = sum(e["seconds"] for e in tasks.values())
        print(f"| {name} | {wall:.1f} | {busy:.1f} | {wall - busy:.1f} | {100 * (wall - busy) / wall:.1f}% |")


if __name__ == "__main__":
    main()
