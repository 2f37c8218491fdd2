"""The model card: the Markdown description of a registered version, as the MLflow UI shows it."""

from __future__ import annotations

import json
from typing import Any

from tuneforge import checklist
from tuneforge.registry import LOWER_IS_BETTER
from tuneforge.tracking import flatten


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def render(result: dict[str, Any], lineage: dict[str, Any], evaluation: dict[str, Any], model_source: str,
           gguf_files: dict[str, str], primary_metric: str, items: list[dict[str, str]]) -> str:
    """`result` is the registration (name, version, decision), `lineage` the evaluated model's (it carries what every
    stage before it recorded), `evaluation` evaluate's metrics, `model_source` where the merged model is kept,
    `gguf_files` type -> URI."""
    name, version = result["name"], result["version"]
    commit = f" at commit `{lineage['base_model_commit']}`" if lineage.get("base_model_commit") else ""
    lines = [f"# {name} version {version}", "", f"Fine-tuned from **{lineage.get('base_model')}**{commit} (fingerprint "
             f"`{str(lineage.get('base_model_fingerprint', ''))[:16]}`).", ""]
    if evaluation.get("winner"):
        lines += [f"The **{evaluation['winner']}** model: {evaluation['winner_reason']}.", ""]

    lines += ["## Data", "", "| source | fingerprint | size (bytes) |", "|---|---|---|"]
    for obj in lineage.get("data_objects", []):
        digest = obj.get("sha256") or obj.get("etag", "")
        lines.append(f"| {obj.get('key', obj['source'])} | {digest[:16]} | {obj.get('size', '-')} |")
    rows = lineage.get("data_rows", {})
    if rows:
        lines += ["", "Rows after data-prep: " + ", ".join(f"{k} {v}" for k, v in rows.items()) + "."]
    short = {k: str(lineage.get(k, ""))[:16] for k in ("data_fingerprint", "data_sha256", "chat_template_sha256")}
    lines += ["", f"Data fingerprint `{short['data_fingerprint']}`, prepared data `{short['data_sha256']}`, "
              f"chat template `{short['chat_template_sha256']}`.", ""]

    settings = flatten(lineage.get("config", {}))
    lines += ["## Settings that differ from the defaults", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | `{json.dumps(value)}` |" for key, value in sorted(settings.items())] + [""]

    columns = [c for c in ("base", "champion", "sft", "dpo", "grpo", "candidate") if c in evaluation]
    lines += ["## Evaluation (same eval split)", "", "| metric | " + " | ".join(columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for metric in evaluation["candidate"]:
        mark = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        bold = "**" if metric == primary_metric else ""
        cells = [_number(evaluation[c].get(metric)) for c in columns]
        lines.append(f"| {bold}{metric}{bold}{mark} | " + " | ".join(cells) + " |")
    if evaluation.get("champion_error"):
        lines += ["", f"The champion could not be re-scored: {evaluation['champion_error']}."]
    decision = result["decision"]
    state = "promoted to champion" if decision.get("promoted") else (
        "waiting for approval" if decision.get("approval_pending") else "not promoted")
    lines += ["", f"## Decision: {state}", ""] + [f"- {reason}" for reason in decision.get("reasons", [])] + [""]

    if gguf_files:
        lines += ["## GGUF files", "", "| type | file |", "|---|---|"]
        lines += [f"| {t} | {uri} |" for t, uri in gguf_files.items()]
        first_type, first = next(iter(gguf_files.items()))
        local = first.rsplit("/", 1)[-1]
        lines += ["", "Copy a file and its `Modelfile.TYPE` from the same folder, then:", "", "```bash",
                  f"ollama create {name} -f Modelfile.{first_type}   # in the folder holding {local}",
                  f"llama-cli -m {local} -cnv", "```", ""]

    if items:
        lines += ["## The guide's checklist", "", checklist.markdown(items)]
    lines += ["## Lineage", "", f"- merged model: `{model_source}`"]
    for key, label in (("parent_run", "evaluate run"), ("code_version", "code version"), ("base_model", "base model")):
        if lineage.get(key):
            lines.append(f"- {label}: `{lineage[key]}`")
    return "\n".join(lines) + "\n"
