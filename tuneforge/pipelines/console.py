"""What `tuneforge run` shows while the pipeline runs: one line per task as it starts and ends (stage, status, seconds,
its key metric), a progress line with step, loss and ETA while sft or dpo trains, the error of a task that failed, and
a table at the end. Everything the tasks print (kfp.local's executor JSON, the libraries' logs) goes to a log file in
the run's folder instead; `--verbose` shows that stream as it comes.

kfp.local runs each task as a subprocess that writes to this process's stdout and stderr, so the stream is taken at
the file-descriptor level and read back from the log file as it grows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([\w-]+)'")
FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
CACHED = re.compile(r"Task ([\w-]+) cache hit")
SKIPPED = re.compile(r"Skipping conditional task ([\w-]+)")
PROGRESS = re.compile(r"(\d+)%\|[^|]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
LOSS = re.compile(r"\{'loss': '?([\d.e+-]+)'?")
ERROR = re.compile(r"^\s*(?:\[rank\d\]: )?((?:tuneforge\.errors\.)?[A-Za-z_.]*(?:Error|Exception)): (.+)$")
# Tasks of the pipeline's own bookkeeping: shown only when they fail.
QUIET = {"start", "finish-run", "champion-to-beat"}


class Console:
    def __init__(self, out: TextIO):
        self.out = out
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.current: str | None = None
        self.loss: str | None = None
        self.errors: dict[str, str] = {}
        self.progress_shown = False

    def _print(self, line: str) -> None:
        if self.progress_shown:
            self.out.write("\r\x1b[2K" if self.out.isatty() else "\n")
            self.progress_shown = False
        self.out.write(line + "\n")
        self.out.flush()

    def _progress(self, line: str) -> None:
        if not self.out.isatty():
            return  # a progress line that rewrites itself only makes sense on a terminal
        self.out.write("\r\x1b[2K" + line)
        self.out.flush()
        self.progress_shown = True

    def feed(self, raw: str) -> None:
        line = ANSI.sub("", raw)
        if found := STARTED.search(line):
            task = found.group(1)
            self.started[task], self.current, self.loss = time.monotonic(), task, None
            if task not in QUIET:
                self._print(f"  {task:<16} running")
        elif found := FINISHED.search(line):
            task, status = found.groups()
            self.seconds[task] = time.monotonic() - self.started.get(task, time.monotonic())
            self.status[task] = "succeeded" if status == "SUCCESS" else "failed"
            if task not in QUIET or status != "SUCCESS":
                error = f"  {self.errors[task]}" if task in self.errors else ""
                self._print(f"{'✓' if status == 'SUCCESS' else '✗'} {task:<16} {self.status[task]:<9} "
                            f"{self.seconds[task]:6.0f} s{error}")
        elif found := CACHED.search(line):
            self.status[found.group(1)] = "cached"
            self._print(f"✓ {found.group(1):<16} cached")
        elif found := SKIPPED.search(line):
            self._print(f"- {found.group(1):<16} skipped (not the candidate's branch: evaluate chose the other model, "
                        "or none beat the base model)")
        elif found := ERROR.search(line):
            if self.current:
                self.errors[self.current] = f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2)[:300]}"
        elif self.current in ("sft", "dpo", "grpo"):
            if found := LOSS.search(line):
                self.loss = found.group(1)
            for part in line.split("\r"):
                if found := PROGRESS.search(part):
                    _, step, total, _, eta = found.groups()
                    loss = f"  loss {float(self.loss):.4g}" if self.loss else ""
                    self._progress(f"  {self.current:<16} step {step}/{total}{loss}  ETA {eta}")

    def stage_seconds(self, stage: str) -> float:
        """A stage's time in this run: KFP names a task of the branch after DPO export-gguf-2, register-2, ..."""
        return sum(s for task, s in self.seconds.items() if re.fullmatch(rf"{re.escape(stage)}(-\d+)?", task))

    def table(self, summary: dict[str, Any]) -> None:
        rows = []
        for stage, entry in summary.get("stages", {}).items():
            metric = key_metric(stage, entry)
            rows.append(f"  {stage:<12} {entry['status']:<10} {self.stage_seconds(stage):>6.0f} s  {metric}")
        for stage, why in summary.get("skipped", {}).items():
            rows.append(f"  {stage:<12} {'skipped':<10} {'':>8}  {why}")
        self._print("\n" + "\n".join(["  stage        status     seconds  key metric", *rows]))


def key_metric(stage: str, entry: dict[str, Any]) -> str:
    """The number a person looks at first for a stage's output."""
    if "output" not in entry:
        return ""
    try:
        manifest = json.loads((Path(entry["output"]) / "manifest.json").read_text())
    except (OSError, ValueError):
        return ""
    metrics = manifest["metrics"]
    if stage == "data-prep":
        if metrics.get("classification_train"):
            return f"{metrics['classification_train']} labelled rows, {len(metrics['labels']['train'])} labels"
        return f"{metrics['sft_train']} SFT rows, {metrics['preference_train']} pairs"
    if stage == "sft" and "eval_accuracy" in metrics:
        return (f"train loss {metrics['train_loss']:.4g}, validation accuracy {metrics['eval_accuracy']:.3g} "
                f"(step {metrics.get('kept_step', metrics['steps'])} kept)")
    if stage in ("sft", "dpo"):
        guard = manifest["lineage"].get("likelihood_guard", {})
        tripped = "; the likelihood guard tripped" if guard.get("tripped") else ""
        return f"train loss {metrics['train_loss']:.4g}" + (f", eval loss {metrics['eval_loss']:.4g}"
                                                             if "eval_loss" in metrics else "") + tripped
    if stage == "grpo":
        return f"reward {metrics['reward_first_step']:.3g} -> {metrics['reward_last_step']:.3g}" \
            if "reward_first_step" in metrics else f"train loss {metrics['train_loss']:.4g}"
    if stage.startswith("merge"):
        return f"merge check {metrics.get('merge_max_abs_logit_diff', 0):.2g}"
    if stage == "evaluate":
        primary = manifest["lineage"].get("config", {}).get("registry", {}).get("primary_metric", "task_score")
        winner = f" (the {metrics['winner']} model)" if metrics.get("winner") else ""
        base, candidate = metrics["base"].get(primary, float("nan")), metrics["candidate"].get(primary, float("nan"))
        return f"{primary} {base:.3g} -> {candidate:.3g}{winner}"
    if stage == "export-gguf":
        return ", ".join(f"{t} KL {c['mean_kl']:.3g}" for t, c in metrics["types"].items())
    if stage == "serve-check":
        return ", ".join(f"{t} agreement {min(c['agreement'] for c in r['by_metric'].values()):.3g}, "
                         f"{r['tokens_per_second']:.1f} tokens/s" for t, r in metrics["types"].items())
    if stage == "register":
        decision = metrics["decision"]
        return "unchanged" if decision.get("unchanged") else f"version {metrics['version']}" + (
            " champion" if decision["promoted"] else "")
    return ""


@contextlib.contextmanager
def captured(log_path: Path, verbose: bool) -> Iterator[Console | None]:
    """While inside, everything written to stdout and stderr (this process's and its subprocesses') goes to
    `log_path`, and a Console shows the digest on the real stderr. Verbose: the stream stays as it is."""
    if verbose:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = open(log_path, "ab")  # noqa: SIM115 (held open while the descriptors point at it)
    console = Console(os.fdopen(os.dup(saved[2]), "w", buffering=1))
    done = threading.Event()

    def follow() -> None:
        with open(log_path, "rb") as reader:
            pending = b""
            while True:
                chunk = reader.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = re.split(rb"[\r\n]", pending)
                    for line in lines:
                        console.feed(line.decode("utf-8", errors="replace"))
                elif done.is_set():
                    return
                else:
                    time.sleep(0.2)

    reader = threading.Thread(target=follow, name="console", daemon=True)
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    reader.start()
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        done.set()
        reader.join()
