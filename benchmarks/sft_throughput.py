"""SFT throughput: tuneforge's sft stage against the plain recipe a user would write from the TRL and PEFT docs,
and against the same recipe as a skilled TRL user sets it, same model, same rows, same number of rows per
optimizer step, in one run. Reports non-padding tokens per second, the share of padding in the trained
batches, peak memory, useful FLOP/s as a share of this machine's matmul peak (measured in the same run), and
the held-out loss of every result.

    python benchmarks/sft_throughput.py [--rows 160] [--data uniform|varied] [--sides plain,expert,...]
                                        [--model smollm2-135m-instruct]

Data: uniform is the quickstart's extraction rows (examples/data/extract_train.jsonl, 72-83 tokens each, so
batches are hardly padded); varied is varied_data.py's rows, whose lengths are long-tailed like alpaca's (130
tokens on average, median 116, up to 300), training and held-out rows from disjoint parts of one stream.

The plain recipe (TRL "SFTTrainer" + PEFT "LoraConfig" quickstarts, as the TRL docs set it for a CPU or small
GPU): the model loaded in fp32, LoRA r=16 alpha=32 dropout=0.05 on all linear layers, prompt/completion rows
(loss on the completion), padded batches of 2 with 4 accumulation steps, gradient checkpointing on, bf16
autocast, no packing. The expert recipe is the same trainer set for speed: gradient checkpointing off, LoRA
dropout 0, batches of 8 with no accumulation, batches grouped by length (train_sampling_strategy
"group_by_length"). tuneforge runs `tuneforge stage sft` with the same LoRA settings, learning rate, rows per
optimizer step (8) and number of steps; tuneforge-dropout with the plain recipe's LoRA dropout.

Padding: the padded positions (attention mask 0) among all positions of the batches trained; the recipes count
them by wrapping the trainer's data collator, tuneforge records its own (`padding_share` in the stage's
manifest.json metrics; "-" where it does not).

On a GPU every side trains there, the peak memory is the GPU's (torch.cuda.max_memory_allocated of the training
process; peak RSS on the CPU) and the matmul peak is the GPU's (8192-wide bf16 products). The json line of each
side also says how the stage batched its rows ("batching").

Useful FLOPs per non-padding token = 2N forward + 2N activation gradients (+ 2N weight gradients for weights
that train), N = the parameters of the model's matmuls (every Linear, the LM head included, the embedding
lookup not); attention scores and recomputation are not counted. LoRA trains only its adapters, so a LoRA
token needs 4N + 6N_lora.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from varied_data import alpaca_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "extract_train.jsonl"
DATA_KINDS = ("uniform", "varied")
ROWS_PER_STEP = 8
EVAL_ROWS = 40
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
# The TRL recipe as its docs show it, and as a skilled TRL user sets it for speed; both train 8 rows per
# optimizer step, like tuneforge.
RECIPES = {
    "plain": {"batch_size": 2, "grad_accum": 4, "gradient_checkpointing": True, "lora_dropout": LORA["dropout"],
              "sampling": "random"},
    "expert": {"batch_size": 8, "grad_accum": 1, "gradient_checkpointing": False, "lora_dropout": 0.0,
               "sampling": "group_by_length"},
}
# tuneforge with its defaults, with the plain recipe's LoRA dropout (tuneforge's default is 0), and with batches
# grouped by length whatever `batching: auto` picks (not run unless asked for).
SIDES = ("plain", "expert", "tuneforge", "tuneforge-dropout", "tuneforge-grouped")
DEFAULT_SIDES = SIDES[:4]


def rows(count: int, held_out: bool = False, data: str = "uniform") -> list[dict]:
    if data == "varied":
        return alpaca_rows(EVAL_ROWS if held_out else count, held_out=held_out)
    lines = DATA.read_text().splitlines()
    chosen = lines[-EVAL_ROWS:] if held_out else lines[:count]
    return [json.loads(line) for line in chosen]


def as_prompt_completion(row: dict) -> dict:
    # The same user turn tuneforge's data-prep builds from an alpaca row.
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input", "").strip() else row["instruction"]
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": row["output"]}]}


def model_path(name: str) -> str:
    from tuneforge.config import BaseModelSettings
    from tuneforge.models import resolve

    return resolve(BaseModelSettings(source=name))


class PaddingCount:
    """Wraps a trainer's data collator and counts the padded positions (attention mask 0) of the batches it builds:
    the recipes train one pass over the rows, so these are the batches trained."""

    def __init__(self, collate):
        self.collate, self.padded, self.total = collate, 0, 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.padded += int((batch["attention_mask"] == 0).sum())
        self.total += batch["attention_mask"].numel()
        return batch

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"padded": self.padded, "total": self.total}))


def recipe(side: str, data: str, model: str, count: int, output: Path) -> None:
    """The TRL and PEFT docs' recipe with RECIPES[side]'s settings, nothing more."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    settings = RECIPES[side]
    torch.set_num_threads(os.cpu_count())
    dataset = Dataset.from_list([as_prompt_completion(r) for r in rows(count, data=data)])
    args = SFTConfig(
        output_dir=str(output / "checkpoints"), per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["grad_accum"], gradient_checkpointing=settings["gradient_checkpointing"],
        # group_by_length: Trainer sorts random runs of min(50, rows / 32) batches by the rows' input_ids lengths
        train_sampling_strategy=settings["sampling"],
        bf16=True, use_cpu=not torch.cuda.is_available(), packing=False, learning_rate=LEARNING_RATE,
        max_steps=count // ROWS_PER_STEP, logging_steps=1, save_strategy="no", report_to="none", seed=42,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=settings["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, train_dataset=dataset,
                         peft_config=peft_config)
    trainer.data_collator = padding = PaddingCount(trainer.data_collator)
    trainer.train()
    trainer.model.save_pretrained(output / "adapter")
    (output / "train_history.json").write_text(json.dumps(trainer.state.log_history))
    padding.save(output / "padding.json")
    save_gpu_peak(output)


def save_gpu_peak(output: Path) -> None:
    """On a GPU, the training process's peak allocated memory (GiB), as the stages record it (peak_gpu_memory_gib)."""
    import torch

    if torch.cuda.is_available():
        (output / "gpu_peak.json").write_text(json.dumps({"peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}))


def gpu_peak_mib(output: Path) -> float | None:
    """The peak GPU memory a side recorded (a recipe's gpu_peak.json, the stage's manifest metric), in MiB."""
    for path in (output / "gpu_peak.json", output / "manifest.json"):
        if path.exists():
            record = json.loads(path.read_text())
            gib = record.get("metrics", record).get("peak_gpu_memory_gib")
            if gib is not None:
                return gib * 1024
    return None


def tuneforge_stage(model: str, count: int, output: Path, lora_dropout: float | None, data: str,
                    batching: str = "auto") -> list[str]:
    """The data-prep output (not timed) and the sft command (timed); lora_dropout None keeps tuneforge's default."""
    import yaml

    (output / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(count, data=data)))
    config = {
        "name": "bench", "workdir": str(output / "work"), "base_model": {"source": model},
        # data-prep drops rows over max_length: 512 keeps every row (varied rows have at most 300 tokens)
        "data": {"sources": [{"path": str(output / "train.jsonl")}], "eval_fraction": 0.0, "max_length": 512},
        "sft": {"method": "lora", "learning_rate": LEARNING_RATE, "max_steps": count // ROWS_PER_STEP,
                "batch_size": ROWS_PER_STEP, "grad_accum": 1, "precision": "bf16", "logging_steps": 1,
                # the plain recipe's schedule (SFTConfig's defaults), so that only the speed differs
                "lr_scheduler": "linear", "warmup_ratio": 0.0, "batching": batching,
                "save_steps": 10_000, "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"}},
    }
    if lora_dropout is not None:
        config["sft"]["lora"]["dropout"] = lora_dropout
    (output / "config.yaml").write_text(yaml.safe_dump(config))
    tuneforge = [sys.executable, "-m", "tuneforge.cli", "stage"]
    subprocess.run([*tuneforge, "data-prep", "--config", str(output / "config.yaml"), "--output", str(output / "data")],
                   check=True, capture_output=True)
    return [*tuneforge, "sft", "--config", str(output / "config.yaml"), "--input", f"data={output / 'data'}",
            "--output", str(output / "sft")]


# Runs a command and prints its peak RSS in KiB last: the children's maximum of a process with one child is that
# child's (GNU time's %M, without needing GNU time).
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def timed(command: list[str]) -> float:
    """Peak RSS (MiB) of a command."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1]) / 1024


def throughput(history_file: Path) -> tuple[float, float]:
    """Non-padding tokens trained and the training loop's seconds, as the trainer logged them."""
    tokens = max(e["num_tokens"] for e in json.loads(history_file.read_text()) if "num_tokens" in e)
    return float(tokens), train_seconds(history_file)


def train_seconds(history_file: Path) -> float:
    """The training loop's seconds, as the trainer logged them."""
    return float(next(e["train_runtime"] for e in json.loads(history_file.read_text()) if "train_runtime" in e))


def padding_share(output: Path) -> float | None:
    """The share of padded positions in the trained batches: the recipes' count, or the stage's manifest metric."""
    if (output / "padding.json").exists():
        count = json.loads((output / "padding.json").read_text())
        return count["padded"] / count["total"]
    manifest = json.loads((output / "manifest.json").read_text()) if (output / "manifest.json").exists() else {}
    return manifest.get("metrics", {}).get("padding_share")


def held_out_loss(model: str, adapter: Path, data: str) -> float:
    """Mean cross-entropy of the completion tokens of the held-out rows, in fp32, the same way for every side."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    network = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network.to(device)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in map(as_prompt_completion, rows(0, held_out=True, data=data)):
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"]
            labels = torch.tensor([[-100] * len(prompt) + full[len(prompt):]])
            loss = network(input_ids=torch.tensor([full], device=device), labels=labels.to(device)).loss
            trained = int((labels[0, 1:] != -100).sum())
            total, count = total + float(loss) * trained, count + trained
    return total / count


def matmul_peak(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of large square matmuls in a dtype on this machine: the GPU where there is one (8192-wide products of
    random data), else all CPU cores."""
    import torch

    torch.set_num_threads(os.cpu_count())
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else size
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * done / (time.perf_counter() - started)


def matmul_parameters(model: str) -> tuple[int, int]:
    """N (every Linear's weight, the LM head included once) and N_lora for the benchmark's LoRA settings."""
    import torch
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(model)
    linears = [m for name, m in network.named_modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.weight.numel() for m in {id(m.weight): m for m in linears}.values())
    n_lora = sum(LORA["r"] * (m.in_features + m.out_features) for name, m in network.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    return n, n_lora


def batching_choice(output: Path) -> str:
    """How the stage batched its rows and the attention it used (its manifest's lineage), "" for the recipes."""
    manifest = output / "manifest.json"
    if not manifest.exists():
        return ""
    lineage = json.loads(manifest.read_text())["lineage"]
    attention = lineage.get("attention")
    return f"{lineage.get('batching')}, {attention} attention" if attention else lineage.get("batching", "")


def chosen_sides(parser: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]) -> list[str]:
    """The sides to run: --only, or --sides checked against the benchmark's own."""
    sides = [args.only] if args.only else args.sides.split(",")
    if set(sides) - set(known):
        parser.error(f"--sides: unknown {', '.join(sorted(set(sides) - set(known)))}")
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=160, help="rows trained on (a multiple of 8)")
    parser.add_argument("--data", choices=DATA_KINDS, default="uniform",
                        help="uniform: the quickstart's rows; varied: varied_data.py's long-tailed lengths")
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                        help=f"the sides to run, comma-separated ({', '.join(SIDES)})")
    parser.add_argument("--only", choices=SIDES, help="run one side (for profiling)")
    parser.add_argument("--recipe-worker", nargs=5, metavar=("SIDE", "DATA", "MODEL", "ROWS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe_worker:
        side, data, model, count, output = args.recipe_worker
        return recipe(side, data, model, int(count), Path(output))
    sides = chosen_sides(parser, args, SIDES)

    model = model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    results = {}
    for side in (s for s in SIDES if s in sides):
        output = work / side
        output.mkdir()
        if side in RECIPES:
            command = [sys.executable, __file__, "--recipe-worker", side, args.data, model, str(args.rows), str(output)]
            history, adapter, trained = output / "train_history.json", output / "adapter", output
        else:
            command = tuneforge_stage(model, args.rows, output, LORA["dropout"] if side == "tuneforge-dropout" else None,
                                      args.data, "grouped" if side == "tuneforge-grouped" else "auto")
            history, adapter, trained = output / "sft" / "train_history.json", output / "sft", output / "sft"
        peak = timed(command)
        tokens, seconds = throughput(history)
        results[side] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "peak_mib": gpu_peak_mib(trained) or peak, "batching": batching_choice(trained),
                         "padding_share": padding_share(trained), "held_out_loss": held_out_loss(model, adapter, args.data)}
        print(side, json.dumps(results[side]), flush=True)

    n, n_lora = matmul_parameters(model)
    peaks = {d: matmul_peak(d) for d in ("bfloat16", "float32")}
    flops_per_token = 4 * n + 6 * n_lora
    print(f"\nN = {n / 1e6:.1f}M matmul parameters, N_lora = {n_lora / 1e6:.2f}M; useful FLOPs/token = 4N + 6N_lora "
          f"= {flops_per_token / 1e9:.3f} GFLOP; matmul peak bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s\n")
    print_table(results, flops_per_token, peaks["bfloat16"], "held_out_loss", "held-out loss")


def print_table(results: dict[str, dict], flops_per_token: float, peak: float, loss_key: str, loss_title: str) -> None:
    """One markdown row per run: the speed against the plain and the expert recipe, the padding share of the
    trained batches and the share of the bf16 matmul peak."""
    print(f"| run | tokens | s | tokens/s | vs plain | vs expert | padding | peak MiB | useful GFLOP/s | % of bf16 peak "
          f"| {loss_title} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def ratio(r: dict, base: str) -> str:
        return f"{r['tokens_per_s'] / results[base]['tokens_per_s']:.2f}x" if base in results else "-"

    for side, r in results.items():
        useful = r["tokens_per_s"] * flops_per_token
        padding = f"{100 * r['padding_share']:.1f}%" if r.get("padding_share") is not None else "-"
        print(f"| {side} | {r['tokens']:.0f} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {ratio(r, 'plain')} "
              f"| {ratio(r, 'expert')} | {padding} | {r['peak_mib']:.0f} | {useful / 1e9:.0f} | {100 * useful / peak:.1f}% "
              f"| {r[loss_key]:.4f} |")

if __name__ == "__main__":
    main()
