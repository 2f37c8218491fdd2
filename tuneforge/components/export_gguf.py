"""Stage export-gguf: the merged model as GGUF files for llama.cpp and Ollama, each one verified.

Inputs: model (a merge output).
For every type in export.types: write the file (f16, bf16, q8_0 in Python; q4_k_m, q5_k_m, q6_k through
llama.cpp's quantizer from an f16 intermediate), then load it (llama.cpp, or transformers' GGUF reader without
the gguf extra), run the probe prompts and compare with the merged model: the tokenizer must produce the same
tokens, and mean KL divergence, top-1 agreement and top-5 overlap must be within the type's tolerance, or the
stage fails and writes nothing.
Outputs: NAME-TYPE.gguf, Modelfile.TYPE (Ollama), verification.json, manifest.json (sha256 of every file).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from gguf import GGUFReader

from tuneforge import chat_templates, gguf_writer, models, storage, tracking
from tuneforge import env as tf_env
from tuneforge.config import Config
from tuneforge.errors import ExportError

log = logging.getLogger(__name__)

STAGE = "export-gguf"

# Ollama's templates are Go templates; these match the Jinja families tuneforge trains with.
OLLAMA_TEMPLATES = {
    "<|im_start|>": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "<|start_header_id|>": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "<start_of_turn>": (
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
    ),
}


def choose_verifier(requested: str) -> str:
    available = gguf_writer.llama_cpp_available()
    if requested == "llama_cpp" and not available:
        raise ExportError("export.verifier llama_cpp needs llama-cpp-python: install the gguf extra")
    if requested == "auto":
        if not available:
            log.warning("llama-cpp-python is not installed: verifying GGUF files with transformers' reader instead")
        return "llama_cpp" if available else "transformers"
    return requested


def gguf_logits(path: Path, verifier: str, token_ids: list[list[int]],
                texts: list[str]) -> tuple[list[np.ndarray], list[list[int]] | None]:
    """Per-position logits of the GGUF file on each probe, and (llama.cpp only) how it tokenizes each text."""
    if verifier == "llama_cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), logits_all=True, n_ctx=max(map(len, token_ids)) + 16,
                    n_threads=len(tf_env.usable_cpus()), verbose=False)
        tokenized = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
        logits = []
        for ids in token_ids:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        llm.close()
        return logits, tokenized
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in token_ids], None


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    ref = torch.from_numpy(np.concatenate(reference))
    cand = torch.from_numpy(np.concatenate(candidate))
    ref_logp, cand_logp = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)
    top5_ref, top5_cand = ref.topk(5).indices, cand.topk(5).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5_ref, top5_cand, strict=True)]
    return {
        "mean_kl": kl.mean().item(),
        "argmax_agreement": (ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
        "top5_overlap": float(np.mean(overlap)),
        "max_abs_logit_diff": (ref - cand).abs().max().item(),
    }


def modelfile(gguf_name: str, chat_template: str, rendered_user_turn: str, stop_tokens: list[str], temperature: float,
              num_ctx: int) -> str:
    """An Ollama Modelfile; `rendered_user_turn` (one user message through the template) reveals a default system prompt."""
    lines = [f"FROM ./{gguf_name}", ""]
    family = next((marker for marker in OLLAMA_TEMPLATES if marker in chat_template), None)
    if family:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[family]}"""')
        default_system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", rendered_user_turn, re.DOTALL)
        if family == "<|im_start|>" and default_system:
            lines.append(f'SYSTEM """{default_system.group(1)}"""')
    else:
        lines.append("# No TEMPLATE: Ollama takes the chat template from the GGUF metadata (tokenizer.chat_template).")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    lines += [f"PARAMETER temperature {temperature}", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    settings = config.export
    model_dir = Path(inputs["model"])
    manifest = storage.read_manifest(model_dir, "merge")
    lineage = tracking.inherit_lineage(manifest, config, inputs)
    chat_template = lineage["chat_template"]
    stop_tokens = lineage["special_tokens"]["stop"]
    gguf_writer.architecture(json.loads((model_dir / "config.json").read_text()))
    verifier = choose_verifier(settings.verifier)
    gguf_writer.require_quantizer([t for t in settings.types if t in gguf_writer.LLAMA_CPP_TYPES])

    tokenizer = models.load_tokenizer(str(model_dir), config.base_model)
    if chat_templates.template_hash(tokenizer.chat_template or "") != lineage["chat_template_sha256"]:
        raise ExportError(f"{model_dir}: its tokenizer's chat template is not the one used in training")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in settings.probes
    ]
    # The rendered chat text already holds the BOS token where the template wants one.
    token_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    reference_model = models.load_model(str(model_dir), config.base_model)
    with torch.no_grad():
        reference = [reference_model(torch.tensor([ids])).logits[0].float().numpy() for ids in token_ids]
    del reference_model

    results: dict[str, Any] = {"verifier": verifier, "types": {}}
    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        intermediate = None
        templates: dict[str, str] = {}
        identity = {"name": config.name, "chat_template": chat_template, "stop_tokens": stop_tokens}
        for gguf_type in settings.types:
            path = out / f"{config.name}-{gguf_type}.gguf"
            log.info("writing %s", path.name)
            if gguf_type in gguf_writer.PYTHON_TYPES:
                gguf_writer.write_gguf(model_dir, path, gguf_type, **identity)
            else:
                if intermediate is None:
                    intermediate = out.parent / f".{out.name}-f16.gguf.tmp"
                    gguf_writer.write_gguf(model_dir, intermediate, "f16", **identity)
                gguf_writer.quantize_with_llama_cpp(intermediate, path, gguf_type, threads=len(tf_env.usable_cpus()))
            logits, tokenized = gguf_logits(path, verifier, token_ids, texts)
            check = compare(reference, logits)
            check["size_bytes"] = path.stat().st_size
            # K-quants need rows of 256; llama.cpp silently stores other tensors in other types, so say which.
            reader = GGUFReader(path)
            check["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
            # The chat template as the file carries it, read back: what llama.cpp and Ollama will render with.
            templates[gguf_type] = chat_templates.template_hash(reader.fields["tokenizer.chat_template"].contents())
            if tokenized is not None:
                check["tokenizer_agreement"] = float(np.mean([a == b for a, b in zip(tokenized, token_ids, strict=True)]))
            results["types"][gguf_type] = check
            (out / f"Modelfile.{gguf_type}").write_text(
                modelfile(path.name, chat_template, texts[0], stop_tokens, settings.temperature, settings.num_ctx)
            )
            tracker.record(f"the {gguf_type} checks", mlflow.log_metrics,
                           {f"{gguf_type}/{k}": v for k, v in check.items() if isinstance(v, (int, float))})
        if intermediate is not None:
            intermediate.unlink()
        (out / "verification.json").write_text(json.dumps(results, indent=2))
        for name in ("verification.json", *(f"Modelfile.{t}" for t in settings.types)):
            tracker.record(f"artifact {STAGE}/{name}", mlflow.log_artifact, str(out / name), artifact_path=STAGE)
        failures = _failures(results, config)
        if failures:
            raise ExportError("GGUF verification failed: " + "; ".join(failures))
        lineage.update(gguf_files={t: f"{config.name}-{t}.gguf" for t in settings.types},
                       gguf_chat_template_sha256=templates, **tracker.run_record())
        storage.write_manifest(out, STAGE, lineage, results)
    log.info("export-gguf: %s", results)
    return tracker.result(results, output)


def _failures(results: dict[str, Any], config: Config) -> list[str]:
    failures = []
    for gguf_type, check in results["types"].items():
        limit = config.export.tolerance(gguf_type)
        if check.get("tokenizer_agreement", 1.0) < 1.0:
            failures.append(f"{gguf_type}: llama.cpp tokenizes the probes differently from the model's tokenizer")
        if check["mean_kl"] > limit.max_kl:
            failures.append(f"{gguf_type}: mean KL {check['mean_kl']:.4g} > {limit.max_kl}")
        if check["argmax_agreement"] < limit.min_argmax:
            failures.append(f"{gguf_type}: top-1 agreement {check['argmax_agreement']:.3f} < {limit.min_argmax}")
        if check["top5_overlap"] < limit.min_top5:
            failures.append(f"{gguf_type}: top-5 overlap {check['top5_overlap']:.3f} < {limit.min_top5}")
    return failures
