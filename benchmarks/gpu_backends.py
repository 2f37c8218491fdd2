"""GPU: the sft stage with `backend: hf` against `backend: unsloth`, LoRA and QLoRA, on the tiny model and on
SmolLM2-135M-Instruct, in one run. Prints non-padding tokens per second and peak VRAM of each, and the ratio of
Unsloth to hf for the same model and method.

    python benchmarks/gpu_backends.py [--steps 40] [--batch-size 8] [--models tiny-llama,smollm2-135m-instruct]
                                      [--out gpu_backends.json]

Needs a CUDA GPU and the Unsloth dependency set (the tuneforge-cuda image, or `pip install -e '.[unsloth]'` over a
CUDA torch); without unsloth it measures the hf rows only and says so. Each combination runs `tuneforge stage sft`
in its own process, so every peak VRAM figure (torch.cuda.max_memory_allocated, which the stage records as
peak_gpu_memory_gib) starts from zero. The whole run takes a few minutes on one H100-class GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "extract_train.jsonl"
MODELS = ("tiny-llama", "smollm2-135m-instruct")
METHODS = ("lora", "qlora")
BACKENDS = ("hf", "unsloth")


def config(model: str, method: str, backend: str, steps: int, batch_size: int, folder: Path) -> Path:
    import yaml

    path = folder / f"{Path(model).name}-{method}-{backend}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "gpu-bench", "workdir": str(folder / "work"), "base_model": {"source": model},
        "data": {"sources": [{"path": str(DATA)}], "eval_fraction": 0.0, "max_length": 512},
        "sft": {"method": method, "backend": backend, "max_steps": steps, "batch_size": batch_size, "precision": "bf16",
                "logging_steps": 1, "save_steps": 100_000, "lr_scheduler": "linear", "warmup_ratio": 0.0},
    }))
    return path


def run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def measure(model: str, method: str, backend: str, args, folder: Path) -> dict:
    path = config(model, method, backend, args.steps, args.batch_size, folder)
    data = folder / f"data-{Path(model).name}"
    tuneforge = [sys.executable, "-m", "tuneforge.cli", "stage"]
    if not (data / "manifest.json").exists():
        done = run([*tuneforge, "data-prep", "--config", str(path), "--output", str(data)], args.timeout)
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1]}
    output = folder / f"sft-{Path(model).name}-{method}-{backend}"
    started = time.monotonic()
    done = run([*tuneforge, "sft", "--config", str(path), "--input", f"data={data}", "--output", str(output)], args.timeout)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    history = json.loads((output / "train_history.json").read_text())
    manifest = json.loads((output / "manifest.json").read_text())
    tokens = max(e["num_tokens"] for e in history if "num_tokens" in e)
    seconds = next(e["train_runtime"] for e in history if "train_runtime" in e)
    return {"tokens_per_second": tokens / seconds, "peak_vram_gib": manifest["metrics"].get("peak_gpu_memory_gib"),
            "train_loss": manifest["metrics"]["train_loss"], "backend": manifest["lineage"]["backend"],
            "stage_seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per stage run")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated base_model.source values (built-in names or model directories)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible: this benchmark compares the GPU backends (see docs/benchmarks.md for the CPU ones)")
    backends = BACKENDS if importlib.util.find_spec("unsloth") else ("hf",)
    if len(backends) == 1:
        print("unsloth is not installed here: measuring backend hf only", file=sys.stderr)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.steps} steps of {args.batch_size} rows",
          file=sys.stderr)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tuneforge-gpu-bench-") as folder:
        for model in args.models.split(","):
            for method in METHODS:
                for backend in backends:
                    key = f"{Path(model).name} {method} {backend}"
                    results[key] = measure(model, method, backend, args, Path(folder))
                    print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
    print(f"{'model':<24}{'method':<7}{'backend':<9}{'tokens/s':>10}{'x hf':>7}{'peak VRAM GiB':>15}{'x hf':>7}{'loss':>8}")
    for key, row in results.items():
        model, method, backend = key.split()
        if "error" in row:
            print(f"{model:<24}{method:<7}{backend:<9}  failed: {row['error']}")
            continue
        base = results.get(f"{model} {method} hf", {})
        speed = row["tokens_per_second"] / base["tokens_per_second"] if "tokens_per_second" in base else float("nan")
        memory = (row["peak_vram_gib"] / base["peak_vram_gib"]
                  if base.get("peak_vram_gib") and row["peak_vram_gib"] else float("nan"))
        print(f"{model:<24}{method:<7}{backend:<9}{row['tokens_per_second']:>10.0f}{speed:>7.2f}"
              f"{row['peak_vram_gib'] or float('nan'):>15.2f}{memory:>7.2f}{row['train_loss']:>8.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
