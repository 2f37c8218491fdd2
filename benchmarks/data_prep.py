"""data-prep throughput: `tuneforge stage data-prep` against its limit, the raw `tokenizers` batch encoder on the
same rendered chat texts, in one run; the stage with 1, 2 and (the machine's cores) processes (data.num_proc).

    python benchmarks/data_prep.py [--rows 20000] [--procs 1,2] [--repeats 2]

Data: examples/data/extract_train.jsonl varied into --rows unique rows, 3/4 alpaca rows (some with longer
inputs) and 1/4 messages rows (1-3 user/assistant turns, half with a system turn), model smollm2-135m-instruct.
The limit: the texts data-prep writes, rendered here with the model's chat template (untimed), then
`tokenizers.Tokenizer.from_file(tokenizer.json).encode_batch(texts, add_special_tokens=False)` (its Rust thread
pool, all cores). The stage runs as the pipeline runs it, `python -m tuneforge.cli stage data-prep` in a
subprocess, against an MLflow store that already exists (a warm-up run creates it). Three times for the stage:
wall (the subprocess: interpreter, imports, config, then the stage), in-stage (the stage's own timer, from
reading the files to the manifest) and render+tokenize (the part that scales with the rows and with
num_proc: chat template, tokenizer, loss masks, length filter). Each number is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "examples" / "data" / "extract_train.jsonl"
MODEL = "smollm2-135m-instruct"


def generate(count: int, folder: Path) -> list[Path]:
    """--rows unique rows in two files: alpaca (3/4) and messages (1/4)."""
    base = [json.loads(line) for line in BASE.read_text().splitlines()]
    rng = random.Random(0)
    n_chat = count // 4
    alpaca = []
    for i in range(count - n_chat):
        row = dict(base[i % len(base)])
        extra = [rng.choice(base)["input"] for _ in range(rng.choice((0, 0, 1, 3)))]  # some longer contexts
        row["input"] = " ".join([row["input"], *extra, f"(case {i})"])
        alpaca.append(row)
    chat = []
    for i in range(n_chat):
        turns = []
        for j in range(rng.choice((1, 2, 3))):
            row = rng.choice(base)
            turns += [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']} (case {i}.{j})"},
                      {"role": "assistant", "content": row["output"]}]
        if i % 2:
            turns.insert(0, {"role": "system", "content": "You extract structured data. Answer with JSON only."})
        chat.append({"messages": turns})
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "alpaca.jsonl", folder / "chat.jsonl"]
    for path, rows in zip(files, (alpaca, chat), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def conversations(files: list[Path]) -> list[list[dict]]:
    """The messages data-prep builds from these rows (alpaca: user = instruction + blank line + input)."""
    out = []
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.append(row["messages"] if "messages" in row else [
                {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                {"role": "assistant", "content": row["output"]}])
    return out


def raw_limit(model: str, texts: list[str], repeats: int) -> tuple[float, float, int]:
    """Best wall and CPU seconds of encode_batch over all texts, and the tokens it produced."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    tokenizer.encode_batch(texts[:256], add_special_tokens=False)  # start the thread pool
    best, cpu, tokens = float("inf"), float("inf"), 0
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        best, cpu = min(best, time.perf_counter() - started), min(cpu, time.process_time() - cpu_started)
        tokens = sum(len(e.ids) for e in encodings)
    return best, cpu, tokens


def write_config(path: Path, work: Path, files: list[Path]) -> Path:
    import yaml

    config = {"name": "bench", "workdir": str(work), "base_model": {"source": MODEL},
              "data": {"sources": [{"path": str(f)} for f in files], "max_length": 4096}}
    path.write_text(yaml.safe_dump(config))
    return path


def stage(config: Path, output: Path, procs: int | None) -> dict[str, float]:
    """Run the stage in a subprocess; its wall and CPU seconds (its workers' included) and the seconds it logged."""
    command = [sys.executable, "-m", "tuneforge.cli", "stage", "data-prep", "--config", str(config),
               "--output", str(output)]
    if procs:
        command += ["--set", f"data.num_proc={procs}"]
    cpu_started = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu_started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    logged = re.search(r"data-prep seconds: (\{.*\})", done.stderr)
    return {"wall": wall, "cpu": cpu, **(json.loads(logged.group(1)) if logged else {})}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def written(output: Path) -> tuple[list[str], int]:
    import pyarrow.parquet as pq

    tables = [pq.read_table(output / f"sft_{split}.parquet") for split in ("train", "eval")]
    texts = [t for table in tables for t in table.column("text").to_pylist()]
    return texts, sum(len(ids) for table in tables for ids in table.column("input_ids").to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--procs", default=",".join(dict.fromkeys(["1", "2", str(os.cpu_count() or 1)])),
                        help="comma-separated data.num_proc values to run the stage with")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tuneforge.config import BaseModelSettings
    from tuneforge.models import resolve

    model = resolve(BaseModelSettings(source=MODEL))
    work = Path(tempfile.mkdtemp(prefix="data-prep-bench-"))
    files = generate(args.rows, work / "data")
    config = write_config(work / "config.yaml", work / "work", files)
    # Create the MLflow store first, so that no timed run pays for it.
    warm = write_config(work / "warm.yaml", work / "work", generate(200, work / "warm"))
    stage(warm, work / "out-warm", None)

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = tokenizer.apply_chat_template(conversations(files), tokenize=False)  # untimed
    raw_s, raw_cpu, raw_tokens = raw_limit(model, texts, args.repeats)

    procs = [int(p) for p in args.procs.split(",")]
    runs: dict[int, dict[str, float]] = {}
    for _ in range(args.repeats):  # interleaved, so that a busy spell on the machine hits every setting alike
        for p in procs:
            output = work / f"out-{p}"
            result = stage(config, output, p if p > 1 else None)
            best = runs.setdefault(p, result)
            runs[p] = {k: min(v, best.get(k, v)) for k, v in result.items()}
    stage_texts, stage_tokens = written(work / f"out-{procs[0]}")
    identical = [(work / f"out-{p}" / f).read_bytes() == (work / f"out-{procs[0]}" / f).read_bytes()
                 for p in procs for f in ("sft_train.parquet", "sft_eval.parquet")]
    same_texts = sorted(stage_texts) == sorted(texts)

    print(f"\n{args.rows} rows, {raw_tokens} tokens (stage output: {len(stage_texts)} rows, {stage_tokens} tokens; "
          f"same texts as the limit: {same_texts}; parquet identical across num_proc: {all(identical)}); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; best of {args.repeats}\n")
    print("| run | processes | seconds | CPU s | examples/s | tokens/s | share of raw |")
    print("|---|---|---|---|---|---|---|")
    print(f"| raw `encode_batch` (the limit) | {os.cpu_count()} threads | {raw_s:.2f} | {raw_cpu:.2f} "
          f"| {args.rows / raw_s:,.0f} | {raw_tokens / raw_s:,.0f} | 100% |")
    parts = (("stage, wall", "wall"), ("stage, in-stage", "total"), ("stage, render+tokenize", "render_tokenize"))
    for label, key in parts:
        for p in procs:
            seconds = runs[p].get(key)
            if seconds is None:
                continue
            cpu = f"{runs[p]['cpu']:.2f}" if key == "wall" else "-"
            print(f"| {label} | {p} | {seconds:.2f} | {cpu} | {args.rows / seconds:,.0f} "
                  f"| {stage_tokens / seconds:,.0f} | {100 * raw_s / seconds:.0f}% |")
    fixed = {p: {k: round(v, 2) for k, v in r.items()} for p, r in runs.items()}
    print(f"\nstage seconds by part (best of each): {json.dumps(fixed)}")


if __name__ == "__main__":
    main()
