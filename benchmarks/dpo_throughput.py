"""DPO throughput: tuneforge's dpo stage against the plain recipe a user would write from the TRL and PEFT docs,
same starting model, same pairs, same pairs per optimizer step, in one run. Reports trained (non-padding)
tokens per second, peak memory, useful FLOP/s as a share of this machine's matmul peak (measured in the same
run), and the held-out DPO loss of both results.

    python benchmarks/dpo_throughput.py [--pairs 160] [--model smollm2-135m-instruct]

Both start from the same SFT output: a full `tuneforge stage sft` of one step at a negligible learning rate
(so, in effect, the base model), which is what the dpo stage takes as input. The plain recipe (TRL "DPOTrainer"
docs with a PEFT LoraConfig): that model loaded in fp32, LoRA r=16 alpha=32 dropout=0.05 on all linear layers
(the frozen model with the adapter disabled is the reference), conversational prompt/chosen/rejected rows,
batches of 2 pairs with 4 accumulation steps, gradient checkpointing on, bf16 autocast, beta 0.1. tuneforge
runs `tuneforge stage dpo` on the same pairs from data-prep with its defaults and the same LoRA rank, alpha,
learning rate, schedule, pairs per optimizer step (8) and number of steps.

Tokens per pair = prompt + chosen + prompt + rejected, counted once with the model's tokenizer for both sides.
Useful FLOPs per token = the policy's forward and activation gradients (4N), the LoRA weight gradients
(6N_lora) and the reference forward (2N): 6N + 6N_lora (N and N_lora as in sft_throughput.py).
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
from sft_throughput import LORA, matmul_parameters, matmul_peak, model_path, print_table, timed, train_seconds

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "extract_preference.jsonl"
PAIRS_PER_STEP = 8
EVAL_PAIRS = 40
LEARNING_RATE = 5e-5
BETA = 0.1
SIDES = ("plain", "tuneforge")


def pairs(count: int, held_out: bool = False) -> list[dict]:
    lines = DATA.read_text().splitlines()
    return [json.loads(line) for line in (lines[-EVAL_PAIRS:] if held_out else lines[:count])]


def conversational(pair: dict) -> dict:
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def tuneforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", "stage", *args]


def prepare(model: str, count: int, work: Path) -> Path:
    """data-prep and a do-nothing full SFT step, shared by both sides (not timed)."""
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(count)))
    (work / "sft_rows.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    config = {
        "name": "bench", "workdir": str(work / "work"), "base_model": {"source": model},
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


def plain_recipe(start: str, count: int, output: Path) -> None:
    """What the TRL and PEFT docs show, nothing more."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count())
    dataset = Dataset.from_list([conversational(p) for p in pairs(count)])
    args = DPOConfig(
        output_dir=str(output / "checkpoints"), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        gradient_checkpointing=True, bf16=True, use_cpu=True, learning_rate=LEARNING_RATE, beta=BETA,
        max_steps=count // PAIRS_PER_STEP, logging_steps=1, save_strategy="no", report_to="none", seed=42,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(start), args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(start), peft_config=peft_config)
    trainer.train()
    trainer.model.save_pretrained(output / "adapter")
    (output / "train_history.json").write_text(json.dumps(trainer.state.log_history))


def pair_tokens(start: str, count: int) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    total = 0
    for pair in map(conversational, pairs(count)):
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        total += 2 * len(prompt)
        for answer in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[answer], tokenize=True, return_dict=True)["input_ids"]
            total += len(full) - len(prompt)
    return total


def held_out_dpo_loss(start: str, adapter: Path) -> float:
    """Mean DPO loss (beta 0.1) of the held-out pairs: the adapter as policy, the starting model as reference."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32), adapter).eval()

    def completion_logp(pair: dict, answer: str) -> float:
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(pair["prompt"] + pair[answer], tokenize=True, return_dict=True)["input_ids"]
        logp = policy(input_ids=torch.tensor([full])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(full[1:])
        return float(logp.gather(-1, targets[:, None])[len(prompt) - 1:].sum())

    losses = []
    with torch.no_grad():
        for pair in map(conversational, pairs(0, held_out=True)):
            trained = completion_logp(pair, "chosen") - completion_logp(pair, "rejected")
            with policy.disable_adapter():
                reference = completion_logp(pair, "chosen") - completion_logp(pair, "rejected")
            losses.append(float(-F.logsigmoid(torch.tensor(BETA * (trained - reference)))))
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=160, help="pairs trained on (a multiple of 8)")
    parser.add_argument("--only", choices=SIDES, help="run one side (for profiling)")
    parser.add_argument("--plain-recipe-worker", nargs=3, metavar=("MODEL", "PAIRS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_recipe_worker:
        start, count, output = args.plain_recipe_worker
        return plain_recipe(start, int(count), Path(output))

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    start = str(prepare(model_path(args.model), args.pairs, work))
    tokens = pair_tokens(start, args.pairs)
    results = {}
    for side in SIDES:
        if args.only and side != args.only:
            continue
        output = work / side
        output.mkdir()
        if side == "plain":
            command = [sys.executable, __file__, "--plain-recipe-worker", start, str(args.pairs), str(output)]
            history, adapter = output / "train_history.json", output / "adapter"
        else:
            command = tuneforge("dpo", "--config", str(work / "config.yaml"), "--input", f"data={work / 'data'}",
                                "--input", f"model={start}", "--output", str(output / "dpo"))
            history, adapter = output / "dpo" / "train_history.json", output / "dpo"
        peak = timed(command)
        seconds = train_seconds(history)
        results[side] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mib": peak,
                         "held_out_dpo_loss": held_out_dpo_loss(start, adapter)}
        print(side, json.dumps(results[side]), flush=True)

    n, n_lora = matmul_parameters(start)
    peak_bf16 = matmul_peak("bfloat16")
    flops_per_token = 6 * n + 6 * n_lora
    print(f"\nN = {n / 1e6:.1f}M, N_lora = {n_lora / 1e6:.2f}M; useful FLOPs/token = 6N + 6N_lora = "
          f"{flops_per_token / 1e9:.3f} GFLOP; matmul peak bf16 {peak_bf16 / 1e9:.0f} GFLOP/s\n")
    print_table(results, flops_per_token, peak_bf16, "held_out_dpo_loss", "held-out DPO loss")

if __name__ == "__main__":
    main()
