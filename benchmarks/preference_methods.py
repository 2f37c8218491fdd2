"""Preference methods: the dpo stage's `dpo.method`s (dpo, kto, orpo, simpo, cpo) on one config, each trained from
the same SFT output and scored by the same evaluate stage, in one run.

    python benchmarks/preference_methods.py [--config examples/quickstart.yaml] [--methods dpo,kto,orpo,simpo,cpo]
                                            [--workdir runs/benchmarks/preference_methods] [--set KEY=VALUE ...]

data-prep, sft and the SFT model's merge run once (WORKDIR/data, sft, sft-merged) and are reused by a later run when
their folder holds a manifest.json: delete them after changing --config or --set. Then, for each method, `stage dpo`
with `dpo.method` set (timed: the stage's wall clock, model loading included, and the trainer's own loop), its merge,
and `stage evaluate` with the SFT model beside it (WORKDIR/METHOD/...). evaluate scores the base, the SFT and the
method's model on the same held-out rows, pairs and tasks; the SFT row of the table is its SFT score, and each
method's cells show the change from it in brackets. "evaluate keeps" is the model evaluate would pass on to register
(the method's, unless it made the SFT model worse by registry.primary_metric or a guard).

Every --set goes to every stage; the stages' MLflow store and caches go to WORKDIR/runs unless --set workdir=... says
otherwise. Writes WORKDIR/report.md (the table, also printed), results.json, preference_methods.png and
logs/*.log (each stage's stderr).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("dpo", "kto", "orpo", "simpo", "cpo")
# The evaluate metrics in the table, when present; task_* and lm_eval/* scores follow them.
LEADING = ("eval_loss", "preference_accuracy")
PLOTTED = ("preference_accuracy", "task_exact_match")


class Stages:
    """Runs `tuneforge stage` subprocesses with one config and one list of overrides, each stage's stderr in a log."""

    def __init__(self, config: Path, sets: list[str], logs: Path):
        self.config, self.sets, self.logs = config, sets, logs
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, output: Path, inputs: dict[str, Path], sets: tuple[str, ...] = (), label: str = "") -> dict:
        label = label or name
        command = [sys.executable, "-m", "tuneforge.cli", "stage", name, "--config", str(self.config),
                   *(a for key, path in inputs.items() for a in ("--input", f"{key}={path}")), "--output", str(output),
                   *(a for s in (*self.sets, *sets) for a in ("--set", s))]
        log = self.logs / f"{label}.log"
        print(f"{label}: running (log: {log})", flush=True)
        # stderr to a file, not a pipe: a long training run logs a lot, and the tail is all a failure needs
        with log.open("w") as err:
            done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        if done.returncode:
            tail = log.read_text()[-4000:]
            sys.exit(f"{label} failed (exit {done.returncode}): {' '.join(command)}\n--- {log} (tail) ---\n{tail}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def once(self, name: str, output: Path, inputs: dict[str, Path]) -> None:
        """A shared stage, run unless an earlier run left its output complete (a manifest is written last)."""
        if (output / "manifest.json").exists():
            print(f"{name}: reusing {output}", flush=True)
            return
        self.run(name, output, inputs)


def method_run(stages: Stages, method: str, work: Path, data: Path, sft: Path, sft_merged: Path) -> dict:
    folder = work / method
    started = time.perf_counter()
    trained = stages.run("dpo", folder / "dpo", {"data": data, "model": sft}, (f"dpo.method={method}",), f"{method}-dpo")
    seconds = time.perf_counter() - started
    lineage = json.loads((folder / "dpo" / "manifest.json").read_text())["lineage"]
    # After a full SFT the adapter sits on the SFT model, not on the config's base model.
    base = {"base": sft} if lineage.get("adapter_base") == "sft" else {}
    stages.run("merge", folder / "merged", {"model": folder / "dpo", **base}, (f"dpo.method={method}",), f"{method}-merge")
    evaluation = stages.run("evaluate", folder / "evaluate",
                            {"data": data, "model": folder / "merged", "sft_merged": sft_merged, "sft": sft,
                             "dpo": folder / "dpo"},
                            (f"dpo.method={method}",), f"{method}-evaluate")["metrics"]
    return {"seconds": seconds, "train_seconds": trained["metrics"].get("train_runtime"), "train": trained["metrics"],
            "metrics": evaluation["dpo"], "sft": evaluation["sft"], "base": evaluation["base"],
            "winner": evaluation.get("winner"), "winner_reason": evaluation.get("winner_reason")}


def metric_keys(sft: dict) -> list[str]:
    return [k for k in LEADING if k in sft] + [k for k in sft if k.startswith(("task_", "lm_eval/"))]


def table(sft: dict, runs: dict[str, dict]) -> str:
    keys = metric_keys(sft)
    lines = ["| model | dpo stage s | train s | " + " | ".join(keys) + " | evaluate keeps |",
             "|---" * (len(keys) + 4) + "|",
             "| sft | - | - | " + " | ".join(f"{sft[k]:.4f}" for k in keys) + " | - |"]
    for method, run in runs.items():
        cells = [f"{run['metrics'][k]:.4f} ({run['metrics'][k] - sft[k]:+.4f})" for k in keys]
        train = f"{run['train_seconds']:.1f}" if run["train_seconds"] is not None else "-"
        lines.append(f"| {method} | {run['seconds']:.1f} | {train} | " + " | ".join(cells) + f" | {run['winner'] or '-'} |")
    return "\n".join(lines) + "\n"


def plot(sft: dict, runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if k in sft]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.bar(list(runs), [run["metrics"][key] for run in runs.values()], color="#4c72b0")
        ax.axhline(sft[key], color="#c44e52", linestyle="--", label=f"sft {sft[key]:.3f}")
        ax.set_ylim(0, 1)
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated ({', '.join(METHODS)})")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "benchmarks" / "preference_methods")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every stage (repeatable)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {', '.join(sorted(set(methods) - set(METHODS)))}")

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # dpo.enabled: data-prep then insists on preference pairs, and the config may have left DPO off.
    sets = [f"workdir={work / 'runs'}", "dpo.enabled=true", *args.sets]
    stages = Stages(args.config.resolve(), sets, work / "logs")
    data, sft, sft_merged = work / "data", work / "sft", work / "sft-merged"
    stages.once("data-prep", data, {})
    stages.once("sft", sft, {"data": data})
    stages.once("merge", sft_merged, {"model": sft})

    runs = {method: method_run(stages, method, work, data, sft, sft_merged) for method in methods}
    # Every evaluate scores the same SFT model on the same rows; the first one's scores stand for all.
    sft_scores = next(iter(runs.values()))["sft"]
    report = table(sft_scores, runs)
    (work / "report.md").write_text(f"# Preference methods: {args.config.name}\n\n" + report)
    (work / "results.json").write_text(json.dumps({"config": str(args.config.resolve()), "sets": sets,
                                                   "sft": sft_scores, "methods": runs}, indent=2))
    plot(sft_scores, runs, work / "preference_methods.png")
    print("\n" + report)
    print(f"written: {work / 'report.md'}, {work / 'results.json'}, {work / 'preference_methods.png'}")


if __name__ == "__main__":
    main()
