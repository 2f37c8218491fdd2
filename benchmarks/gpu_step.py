"""GPU: where one LoRA training step of a small model goes, host against device. Times forward + backward +
optimizer step of a LoRA model (r 16 on all linear layers, bf16 autocast over fp32 weights, as the sft stage trains
it) on batches of random tokens, and reads torch.profiler's totals for one step: the number of kernels launched and
the GPU's busy time inside the step. When busy time is a small part of the step, the step is bound by launching
work (Python, autograd, the driver), not by the GPU, and more rows per batch come nearly for free.

    python benchmarks/gpu_step.py MODEL_DIR [--batches 8x130,32x130] [--steps 10]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Hugging Face model directory")
    parser.add_argument("--batches", default="8x130,32x130", help="ROWSxTOKENS, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script out
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step(ids: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print("| batch | ms per step | tokens/s | kernels per step | GPU busy ms per step | GPU busy share |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches.split(","):
        rows, tokens = map(int, batch.split("x"))
        ids = torch.randint(0, vocab, (rows, tokens), device=device)
        for _ in range(3):
            step(ids)
        synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(ids)
        synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            step(ids)
            synchronize()
        kernels = [e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3  # microseconds to ms
        print(f"| {rows} x {tokens} | {seconds * 1e3:.1f} | {rows * tokens / seconds:.0f} | {len(kernels)} | {busy:.1f} "
              f"| {busy / (seconds * 1e3):.0%} |", flush=True)


if __name__ == "__main__":
    main()
