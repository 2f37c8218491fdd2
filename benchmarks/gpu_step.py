"""GPU: where one LoRA training step of a small model goes, host against device. Times forward + backward +
optimizer step of a LoRA model (r 16 on all linear layers, bf16 autocast over fp32 weights, TRL's fused LM head
scoring the labelled positions, as the sft stage trains it) on batches of random tokens, and reads torch.profiler's
totals for one step: the operations dispatched (leaf aten ops), the kernels launched and the GPU's busy time inside
the step. When busy time is a small part of the step, the step is bound by launching work (Python, autograd, the
driver), not by the GPU, and more rows per batch come nearly for free.

With --shared-prefix N every row starts with the same N tokens (labels after them), and each batch is also run
with sft's SharedPrefix (those tokens once per batch, `sft.shared_prefix`): it saves compute and adds the prefix's
own forward and backward, a trade that depends on whether the step is bound by compute or by launches.

    python benchmarks/gpu_step.py MODEL_DIR [--batches 8x130,32x130] [--steps 10] [--shared-prefix 43]

Without a GPU it runs on the CPU (kernels and busy time are then 0), which shows the operation counts.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Hugging Face model directory")
    parser.add_argument("--batches", default="8x130,32x130", help="ROWSxTOKENS, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="every row starts with the same N tokens; also run each batch with sft's SharedPrefix")
    args = parser.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tuneforge.components.sft import SharedPrefix

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    shared = SharedPrefix(model.get_base_model())
    vocab = model.config.vocab_size

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True,
                        use_cache=False)
        (-out.log_probs.sum() / out.label_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print("| batch | prefix | ms per step | tokens/s | aten ops per step | kernels per step | GPU busy ms per step "
          "| GPU busy share |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batches.split(","):
        rows, tokens = map(int, batch.split("x"))
        ids = torch.randint(0, vocab, (rows, tokens), device=device)
        ids[:, :args.shared_prefix] = ids[0, :args.shared_prefix]
        labels = ids.clone()
        labels[:, :args.shared_prefix + 1] = -100
        for prefix in ("whole rows", f"{args.shared_prefix} once") if args.shared_prefix else ("whole rows",):
            if prefix != "whole rows":  # whole rows come first
                shared.install()
            for _ in range(3):
                step(ids, labels)
            synchronize()
            started = time.perf_counter()
            for _ in range(args.steps):
                step(ids, labels)
            synchronize()
            seconds = (time.perf_counter() - started) / args.steps
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
                step(ids, labels)
                synchronize()
            events = trace.events()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            operations = [e for e in events if e.name.startswith("aten::")
                          and not any(c.name.startswith("aten::") for c in e.cpu_children)]
            busy = sum(e.device_time for e in kernels) / 1e3  # microseconds to ms
            print(f"| {rows} x {tokens} | {prefix} | {seconds * 1e3:.1f} | {rows * tokens / seconds:.0f} "
                  f"| {len(operations)} | {len(kernels)} | {busy:.1f} | {busy / (seconds * 1e3):.0%} |", flush=True)


if __name__ == "__main__":
    main()
