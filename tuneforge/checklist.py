"""The fine-tuning guide's checklist, ticked from evidence (what the stages measured and recorded), not from the
config. evaluate ticks what it can see (the data, the trained and merged models); register adds what export-gguf did
and keeps the whole list with the registered version. An item is `pass`, `fail` or `n/a`, with its evidence."""

from __future__ import annotations

import re
from typing import Any

from tuneforge import plan
from tuneforge.config import Config
from tuneforge.errors import ConfigError

# An eval loss this far above its best by the end of training is overfitting left to run.
OVERFIT_RISE = 0.05


def _item(name: str, passed: bool | None, evidence: str) -> dict[str, str]:
    return {"item": name, "key": re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"),
            "status": "n/a" if passed is None else "pass" if passed else "fail", "evidence": evidence}


def _memory(stage: str, manifest: dict[str, Any]) -> dict[str, str]:
    """The plan for the stage as it ran (the settings its lineage records) against the GPU it ran on."""
    metrics = manifest["metrics"]
    try:
        planned = plan.stage_memory(Config.model_validate(manifest["lineage"]["config"]), stage)["total"]
    except (ConfigError, ValueError, KeyError) as exc:
        return _item(f"memory plan ({stage})", None, f"no plan: {exc}")
    device = metrics.get("gpu_memory_gib")
    if device is None:
        return _item(f"memory plan ({stage})", None, f"trained on the CPU; the plan for a GPU is {planned:.1f} GiB")
    peak = metrics.get("peak_gpu_memory_gib", 0.0)
    return _item(f"memory plan ({stage})", planned <= device and peak <= device,
                 f"plan {planned:.1f} GiB, peak {peak:.1f} GiB, the GPU has {device:.1f} GiB")


def from_training(config: Config, evaluation: dict[str, Any], data: dict[str, Any], trained: dict[str, dict[str, Any]],
                  merged: dict[str, Any], history: dict[str, list[dict[str, Any]]]) -> list[dict[str, str]]:
    """What evaluate can tick: `data`, `trained` (stage -> manifest of sft/dpo), `merged` the candidate's merge manifest,
    `history` stage -> the Trainer's log history."""
    items = [_item("baseline evaluated", "base" in evaluation,
                   "the base model scored on the held-out data: " + ", ".join(
                       f"{k} {v:.4g}" for k, v in evaluation.get("base", {}).items()))]
    hashes = {"data-prep": data["lineage"]["chat_template_sha256"], "merge": merged["lineage"]["chat_template_sha256"]}
    items.append(_item("chat template the same (data-prep, evaluate)", len(set(hashes.values())) == 1,
                       ", ".join(f"{k} {v[:12]}" for k, v in hashes.items())))
    sft = trained.get("sft", {}).get("metrics", {})
    fraction = sft.get("trained_token_fraction")
    items.append(_item("completion-only loss mask", None if fraction is None else 0 < fraction < 1,
                       "a classifier: its loss is on the label, not on tokens" if config.task == "classification" else
                       "no SFT metrics" if fraction is None else
                       f"{fraction:.1%} of the tokens of a sample batch are trained on" +
                       (" (every token: the prompt is trained on too, sft.loss_on: all)" if fraction >= 1 else "")))
    for stage, manifest in trained.items():
        items.append(_memory(stage, manifest))
    settings = config.sft
    items.append(_item("gradient checkpointing chosen", True, (
        "on (sft.gradient_checkpointing): activations for each layer's input only, recomputed in backward"
        if settings.gradient_checkpointing else
        f"off: faster steps; {_activations(config)} (turn it on where memory is short)")))
    items.append(_eval_watched(config.early_stopping_patience, history.get("sft", []),
                               trained.get("dpo", {}).get("lineage", {}).get("likelihood_guard")))
    reloads = {stage: m["metrics"].get("adapter_reload_max_abs_diff") for stage, m in trained.items()}
    merge_check = merged["metrics"].get("merge_max_abs_logit_diff")
    tolerance = config.merge.tolerance
    reloaded = all(v == 0 for v in reloads.values() if v is not None) and (merge_check is None or merge_check <= tolerance)
    items.append(_item("adapter saved and loaded back", reloaded, "; ".join(
        [f"{stage}: saved weights equal the trained ones (max diff {v:.2g})" for stage, v in reloads.items() if v is not None]
        + ([f"merge loaded the adapter into a fresh base: logits within {merge_check:.2g} of the merged model "
            f"(tolerance {tolerance})"] if merge_check is not None else ["a full fine-tune: no adapter"]))))
    if config.task == "classification":
        items.append(_item("merged model tested at inference", "accuracy" in evaluation.get("candidate", {}),
                           f"the merged classifier labelled {evaluation.get('heldout_rows', 0)} held-out rows (accuracy "
                           f"{evaluation.get('candidate', {}).get('accuracy', 0):.3g})"))
        return items
    generated = [k for k in ("task_exact_match", "task_score") if k in evaluation.get("candidate", {})]
    items.append(_item("merged model tested at inference", bool(generated), (
        f"the merged model generated answers to {data['metrics'].get('eval_tasks', 0)} eval tasks "
        f"(task_score {evaluation['candidate'].get('task_score', 0):.3g})") if generated else
        "no eval tasks, so the merged model generated nothing: set data.eval_tasks to a file of prompts and expected answers"))
    return items


def _eval_watched(patience: int | None, history: list[dict[str, Any]], guard: dict[str, Any] | None) -> dict[str, str]:
    """Watched means a curve: eval loss at least once during training as well as at the end. Early stopping, or an eval
    loss that did not climb away from its best, shows it was acted on."""
    curve = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    dpo = f"; dpo: the likelihood guard {guard['summary'].split(':')[0]}" if guard else ""
    if len({step for step, _ in curve}) < 2:
        return _item("eval loss watched", False, f"sft logged eval loss {len(curve)} time(s), at the end only: nothing "
                     "watched it during training (set sft.eval_steps below the run's steps and keep data.eval_fraction "
                     "above 0)" + dpo)
    best_step, best = min(curve, key=lambda point: point[1])
    last_step, last = curve[-1]
    climbed = last > best * (1 + OVERFIT_RISE)
    stopping = f"early stopping after {patience} evaluations without improvement" if patience else "no early stopping"
    evidence = (f"sft eval loss at {len(curve)} evaluations, best {best:.4g} at step {best_step}, last {last:.4g} at "
                f"step {last_step}; {stopping}")
    if climbed and not patience:
        evidence += "; it climbed past its best: set sft.early_stopping_patience or fewer steps"
    return _item("eval loss watched", not (climbed and not patience), evidence + dpo)


def from_export(items: list[dict[str, str]], template_sha256: str, export: dict[str, Any] | None,
                gguf_templates: dict[str, str]) -> list[dict[str, str]]:
    """register's additions: the chat template inside each GGUF file, and llama.cpp's verification of each."""
    if export is None:
        return [*items, _item("GGUF files verified in llama.cpp", None,
                              "no GGUF files (export.enabled is false, or task classification)")]
    same = all(h == template_sha256 for h in gguf_templates.values())
    checks = export["metrics"]["types"]
    verified = all(c.get("tokenizer_agreement", 1.0) == 1.0 for c in checks.values())
    return [*items,
            _item("chat template the same in the GGUF files", same,
                  ", ".join(f"{t} {h[:12]}" for t, h in gguf_templates.items()) + f" (trained with {template_sha256[:12]})"),
            _item("GGUF files verified in llama.cpp", verified, "; ".join(
                f"{t}: tokenizer agreement {c.get('tokenizer_agreement', 'n/a')}, mean KL {c['mean_kl']:.3g}"
                for t, c in checks.items()))]


def from_serving(items: list[dict[str, str]], serving: dict[str, Any] | None) -> list[dict[str, str]]:
    """register's addition from serve-check: the GGUF files answered the eval tasks, served, like the merged model."""
    if serving is None:
        return [*items, _item("served model answers like the merged one", None,
                              "no serve-check (export.enabled, serve_check.enabled or data.eval_tasks is off)")]
    return [*items, _item("served model answers like the merged one", serving["metrics"]["passed"], "; ".join(
        f"{t} through llama.cpp's server: " + ", ".join(
            f"{m} score {c['score']:.3g} (merged {c['reference_score']:.3g}), agreement {c['agreement']:.3g}"
            for m, c in r["by_metric"].items()) for t, r in serving["metrics"]["types"].items()))]


def _activations(config: Config) -> str:
    try:
        return f"the plan's activations without it are {plan.stage_memory(config, 'sft')['activations']:.1f} GiB"
    except ConfigError as exc:
        return f"no plan for the activations ({exc})"


def markdown(items: list[dict[str, str]]) -> str:
    marks = {"pass": "✓", "fail": "✗", "n/a": "–"}
    lines = ["| | item | evidence |", "|---|---|---|"]
    lines += [f"| {marks[i['status']]} | {i['item']} | {i['evidence']} |" for i in items]
    return "\n".join(lines) + "\n"
