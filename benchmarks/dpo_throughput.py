"""DPO throughput: tuneforge's dpo stage against the plain recipe a user would write from the TRL and PEFT docs,
and against the same recipe as a skilled TRL user sets it, same starting model, same pairs, same pairs per
optimizer step, in one run. Reports trained (non-padding) tokens per second, the share of padding in the
trained batches, peak memory, useful FLOP/s as a share of this machine's matmul peak (measured in the same
run), and the held-out DPO loss of every result.

    python benchmarks/dpo_throughput.py [--pairs 160] [--data uniform|varied] [--sides plain,expert,tuneforge]
                                        [--model smollm2-135m-instruct]

Data: uniform is the quickstart's pairs (examples/data/extract_preference.jsonl, nearly all of one length);
varied is varied_data.py's pairs, long-tailed like alpaca's rows (prompt + chosen 130 tokens on average, up to
300), the rejected answer a wrong one of a different length, training and held-out pairs disjoint.

Both start from the same SFT output: a full `tuneforge stage sft` of one step at a negligible learning rate
(so, in effect, the base model), which is what the dpo stage takes as input. The plain recipe (TRL "DPOTrainer"
docs with a PEFT LoraConfig): that model loaded in fp32, LoRA r=16 alpha=32 dropout=0.05 on all linear layers
(the frozen model with the adapter disabled is the reference), conversational prompt/chosen/rejected rows,
batches of 2 pairs with 4 accumulation steps, gradient checkpointing on, bf16 autocast, beta 0.1. The expert
recipe is the same trainer set for speed: gradient checkpointing off, LoRA dropout 0, batches of 8 pairs with
no accumulation, batches grouped by length (train_sampling_strategy "group_by_length", which here needs a
"length" column: see recipe()). tuneforge runs `tuneforge stage dpo` on the same pairs from data-prep with its
defaults and the same LoRA rank, alpha, learning rate, schedule, pairs per optimizer step (8) and number of
steps.

Tokens per pair = prompt + chosen + prompt + rejected, counted once with the model's tokenizer for every side.
Useful FLOPs per token = the policy's forward and activation gradients (4N), the LoRA weight gradients
(6N_lora) and the reference forward (2N): 6N + 6N_lora (N and N_lora as in sft_throughput.py). Padding as in
sft_throughput.py: the padded positions among all positions of the batches trained (chosen and rejected rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import (
    LORA,
    PaddingCount,
    batching_choice,
    chosen_sides,
    gpu_peak_mib,
    matmul_parameters,
    matmul_peak,
    model_path,
    padding_share,
    print_table,
    save_gpu_peak,
    timed,
    train_seconds,
)
from varied_data import preference_pairs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "extract_preference.jsonl"
PAIRS_PER_STEP = 8
EVAL_PAIRS = 40
LEARNING_RATE = 5e-5
BETA = 0.1
DATA_KINDS = ("uniform", "varied")
# The TRL recipe as its docs show it, and as a skilled TRL user sets it for speed; both train 8 pairs per
# optimizer step, like tuneforge.
RECIPES = {
    "plain": {"batch_size": 2, "grad_accum": 4, "gradient_checkpointing": True, "lora_dropout": LORA["dropout"],
              "sampling": "random"},
    "expert": {"batch_size": 8, "grad_accum": 1, "gradient_checkpointing": False, "lora_dropout": 0.0,
               "sampling": "group_by_length"},
}
SIDES = ("plain", "expert", "tuneforge")


def pairs(count: int, held_out: bool = False, data: str = "uniform") -> list[dict]:
    if data == "varied":
        return preference_pairs(EVAL_PAIRS if held_out else count, held_out=held_out)
    lines = DATA.read_text().splitlines()
    return [json.loads(line) for line in (lines[-EVAL_PAIRS:] if held_out else lines[:count])]


def conversational(pair: dict) -> dict:
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def tuneforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", "stage", *args]


def prepare(model: str, count: int, work: Path, data: str) -> Path:
    """data-prep and a do-nothing full SFT step, shared by every side (not timed)."""
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(count, data=data)))
    (work / "sft_rows.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    config = {
        "name": "bench", "workdir": str(work / "work"), "base_model": {"source": model},
        # data-prep drops rows over max_length: 512 keeps every pair (varied pairs have at most 300 tokens)
        "data": {"sources": [{"path": str(work / "pairs.jsonl")}, {"path": str(work / "sft_rows.jsonl")}],
                 "eval_fraction": 0.0, "max_length": 512},
        "sft": {"method": "full", "max_steps": 1, "batch_size": 1, "learning_rate": 1e-12, "save_steps": 10_000},
        "dpo": {"learning_rate": LEARNING_RATE, "beta": BETA, "max_steps": count // PAIRS_PER_STEP,
                "batch_size": PAIRS_PER_STEP, "grad_accum": 1, "precision": "bf16", "logging_steps": 1,
                "save_steps": 10_000, "lr_scheduler": "linear", "warmup_ratio": 0.0,
                "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"}},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    for command in (tuneforge("data-prep", "--config", str(work / "config.yaml"), "--output", str(work / "data")),
                    tuneforge("sft", "--config", str(work / "config.yaml"), "--input", f"data={work / 'data'}",
                              "--output", str(work / "sft"))):
        subprocess.run(command, check=True, capture_output=True)
    return work / "sft"


def recipe(side: str, data: str, start: str, count: int, output: Path) -> None:
    """The TRL and PEFT docs' recipe with RECIPES[side]'s settings, nothing more."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    settings = RECIPES[side]
    torch.set_num_threads(os.cpu_count())
    tokenizer = AutoTokenizer.from_pretrained(start)
    rows = [conversational(p) for p in pairs(count, data=data)]
    grouped = settings["sampling"] == "group_by_length"
    if grouped:
        # LengthGroupedSampler measures a row's input_ids, which DPOTrainer's tokenized rows do not have (they hold
        # prompt_ids, chosen_ids and rejected_ids): it takes a "length" column instead. The longer of prompt + chosen
        # and prompt + rejected is what sets a batch's padded width.
        for row in rows:
            row["length"] = max(len(tokenizer.apply_chat_template(row["prompt"] + row[answer], tokenize=True,
                                                                  return_dict=True)["input_ids"]) for answer in ("chosen", "rejected"))
    args = DPOConfig(
        output_dir=str(output / "checkpoints"), per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["grad_accum"], gradient_checkpointing=settings["gradient_checkpointing"],
        train_sampling_strategy=settings["sampling"],
        # the trainer drops the columns the model does not take, "length" among them, before it builds the sampler
        remove_unused_columns=not grouped,
        bf16=True, use_cpu=not torch.cuda.is_available(), learning_rate=LEARNING_RATE, beta=BETA,
        max_steps=count // PAIRS_PER_STEP, logging_steps=1, save_strategy="no", report_to="none", seed=42,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=settings["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(start), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.data_collator = padding = PaddingCount(trainer.data_collator)
    trainer.train()
    trainer.model.save_pretrained(output / "adapter")
    (output / "train_history.json").write_text(json.dumps(trainer.state.log_history))
    padding.save(output / "padding.json")
    save_gpu_peak(output)


def pair_tokens(start: str, count: int, data: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    total = 0
    for pair in map(conversational, pairs(count, data=data)):
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        total += 2 * len(prompt)
        for answer in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[answer], tokenize=True, return_dict=True)["input_ids"]
            total += len(full) - len(prompt)
    return total


def held_out_dpo_loss(start: str, adapter: Path, data: str) -> float:
    """Mean DPO loss (beta 0.1) of the held-out pairs: the adapter as policy, the starting model as reference."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32), adapter).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy.to(device)

    def completion_logp(pair: dict, answer: str) -> float:
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(pair["prompt"] + pair[answer], tokenize=True, return_dict=True)["input_ids"]
        logp = policy(input_ids=torch.tensor([full], device=device)).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(full[1:], device=device)
        return float(logp.gather(-1, targets[:, None])[len(prompt) - 1:].sum())

    losses = []
    with torch.no_grad():
        for pair in map(conversational, pairs(0, held_out=True, data=data)):
            trained = completion_logp(pair, "chosen") - completion_logp(pair, "rejected")
            with policy.disable_adapter():
                reference = completion_logp(pair, "chosen") - completion_logp(pair, "rejected")
            losses.append(float(-F.logsigmoid(torch.tensor(BETA * (trained - reference)))))
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=160, help="pairs trained on (a multiple of 8)")
    parser.add_argument("--data", choices=DATA_KINDS, default="uniform",
                        help="uniform: the quickstart's pairs; varied: varied_data.py's long-tailed lengths")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"the sides to run, comma-separated ({', '.join(SIDES)})")
    parser.add_argument("--only", choices=SIDES, help="run one side (for profiling)")
    parser.add_argument("--recipe-worker", nargs=5, metavar=("SIDE", "DATA", "MODEL", "PAIRS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe_worker:
        side, data, start, count, output = args.recipe_worker
        return recipe(side, data, start, int(count), Path(output))
    sides = chosen_sides(parser, args, SIDES)

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    start = str(prepare(model_path(args.model), args.pairs, work, args.data))
    tokens = pair_tokens(start, args.pairs, args.data)
    results = {}
    for side in (s for s in SIDES if s in sides):
        output = work / side
        output.mkdir()
        if side in RECIPES:
            command = [sys.executable, __file__, "--recipe-worker", side, args.data, start, str(args.pairs), str(output)]
            history, adapter, trained = output / "train_history.json", output / "adapter", output
        else:
            command = tuneforge("dpo", "--config", str(work / "config.yaml"), "--input", f"data={work / 'data'}",
                                "--input", f"model={start}", "--output", str(output / "dpo"))
            history, adapter, trained = output / "dpo" / "train_history.json", output / "dpo", output / "dpo"
        peak = timed(command)
        seconds = train_seconds(history)
        results[side] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "peak_mib": gpu_peak_mib(trained) or peak, "batching": batching_choice(trained),
                         "padding_share": padding_share(trained), "held_out_dpo_loss": held_out_dpo_loss(start, adapter, args.data)}
        print(side, json.dumps(results[side]), flush=True)

    n, n_lora = matmul_parameters(start)
    peak_bf16 = matmul_peak("bfloat16")
    flops_per_token = 6 * n + 6 * n_lora
    print(f"\nN = {n / 1e6:.1f}M, N_lora = {n_lora / 1e6:.2f}M; useful FLOPs/token = 6N + 6N_lora = "
          f"{flops_per_token / 1e9:.3f} GFLOP; matmul peak bf16 {peak_bf16 / 1e9:.0f} GFLOP/s\n")
    print_table(results, flops_per_token, peak_bf16, "held_out_dpo_loss", "held-out DPO loss")

if __name__ == "__main__":
    main()
