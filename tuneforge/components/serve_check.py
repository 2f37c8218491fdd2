"""Stage serve-check: every exported GGUF file served by llama.cpp's OpenAI-compatible server (llama-cpp-python's
server extra) and asked the eval tasks through the official openai client, with only the chat template, BOS and EOS
the file carries: nothing of ours renders the prompt or stops the answer.

Inputs: data (data-prep output: the eval tasks), gguf (export-gguf output), evaluation (evaluate output: the merged
model's answer to each task).
For each file: start `python -m llama_cpp.server` on a free loopback port, send each task's messages to
/v1/chat/completions (temperature 0, evaluate.max_new_tokens) and check:
- the prompt: the server must render every task's messages to as many tokens as the training template did (evaluate
  counts them), or the file's template, BOS or special tokens are not the trained ones;
- the answers, scored as evaluate scores them and compared with the merged model's, per task metric: the task score
  and its drop from the merged model's, agreement (mean ROUGE-L between the two answers) and the share of identical
  answers, against serve_check.min_agreement and serve_check.max_score_drop (an EOS the server does not stop on, an
  adapter missing from the merge or a quantization too coarse for the task shows here).
Any failure fails the stage, so register does not run and nothing is promoted. Latency
and tokens/s of each server are recorded. The server is stopped on every path, failure included.
Outputs: serve_check.json, report.md, manifest.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import mlflow

from tuneforge import scoring, serving, storage, tracking
from tuneforge.config import Config
from tuneforge.data import prepared
from tuneforge.errors import ServeCheckError, SetupError

log = logging.getLogger(__name__)

STAGE = "serve-check"
MODEL_ALIAS = "served"


def ask(base_url: str, tasks: list[dict[str, Any]], max_tokens: int, timeout: float) -> tuple[list[str], dict[str, float]]:
    """Each task's messages through the openai client's chat API; the answers, and latency and throughput."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", timeout=timeout, max_retries=0)
    answers, prompt_tokens, latencies, completion_tokens = [], [], [], 0
    for task in tasks:
        started = time.perf_counter()
        reply = client.chat.completions.create(model=MODEL_ALIAS, messages=task["messages"], temperature=0,
                                               max_tokens=max_tokens, seed=0)
        latencies.append(time.perf_counter() - started)
        answers.append((reply.choices[0].message.content or "").strip())
        prompt_tokens.append(reply.usage.prompt_tokens)
        completion_tokens += reply.usage.completion_tokens
    latencies.sort()
    return answers, prompt_tokens, {
        "requests": len(tasks), "latency_mean_s": sum(latencies) / len(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "completion_tokens": completion_tokens, "tokens_per_second": completion_tokens / sum(latencies)}


def prompt_check(gguf_type: str, served: list[int], trained: list[int]) -> tuple[float, list[str]]:
    """The share of prompts the server rendered to as many tokens as evaluate did with the training template, and the
    failure when any differs: a template, BOS or special token the file does not carry as trained."""
    same = [a == b for a, b in zip(served, trained, strict=True)]
    if all(same):
        return 1.0, []
    first = same.index(False)
    return sum(same) / len(same), [
        f"{gguf_type}: llama.cpp's server rendered {same.count(False)} of {len(same)} eval prompts to another number of "
        f"tokens than the training chat template does (task {first}: {served[first]} against {trained[first]}): the "
        "chat template, BOS or special tokens in the file are not the ones trained with"]


def failures(gguf_type: str, by_metric: dict[str, dict[str, float]], config: Config) -> list[str]:
    settings = config.serve_check
    found = []
    for metric, check in by_metric.items():
        least, most = settings.min_agreement.get(metric), settings.max_score_drop.get(metric)
        if least is not None and check["agreement"] < least:
            found.append(f"{gguf_type} {metric} tasks: answers agree with the merged model's {check['agreement']:.3f} "
                         f"< {least} (serve_check.min_agreement.{metric})")
        drop = check["reference_score"] - check["score"]
        if most is not None and drop > most:
            found.append(f"{gguf_type} {metric} tasks: served score {check['score']:.3f}, {drop:.3f} below the merged "
                         f"model's {check['reference_score']:.3f} (serve_check.max_score_drop.{metric} {most})")
    return found


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    data_dir, gguf_dir, evaluation_dir = Path(inputs["data"]), Path(inputs["gguf"]), Path(inputs["evaluation"])
    export = storage.read_manifest(gguf_dir, "export-gguf")
    evaluation = storage.read_manifest(evaluation_dir, "evaluate")
    tasks = prepared.read_jsonl(data_dir / "eval_tasks.jsonl")
    tasks = [tasks[i] for i in prepared.sample(len(tasks), config.evaluate.max_examples, "eval tasks")]
    if not tasks:
        raise SetupError(f"{data_dir}: no eval tasks to serve (set data.eval_tasks, or serve_check.enabled: false)")
    merged = prepared.read_jsonl(evaluation_dir / "answers.jsonl")
    reference = [row["answer"] for row in merged]
    if len(reference) != len(tasks):
        raise SetupError(f"{evaluation_dir}/answers.jsonl has {len(reference)} answers for {len(tasks)} eval tasks: "
                         "evaluate and serve-check must read the same data and evaluate.max_examples")

    serving.require_server()
    lineage = tracking.inherit_lineage(evaluation, config, inputs)
    results: dict[str, Any] = {"types": {}}
    problems: list[str] = []
    samples: dict[str, list[str]] = {}
    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        for gguf_type, name in export["lineage"]["gguf_files"].items():
            log.info("serving %s", name)
            with serving.served(gguf_dir / name, config.serve_check.context_length, config.serve_check.timeout_seconds,
                                out / f"server-{gguf_type}.log", alias=MODEL_ALIAS) as base_url:
                answers, prompt_tokens, speed = ask(base_url, tasks, config.evaluate.max_new_tokens,
                                                    config.serve_check.timeout_seconds)
            checks = scoring.by_metric(answers, reference, tasks)
            same_prompts, prompt_problems = prompt_check(gguf_type, prompt_tokens, [row["prompt_tokens"] for row in merged])
            results["types"][gguf_type] = {**speed, **scoring.task_metrics(answers, tasks), "same_prompt_tokens": same_prompts,
                                           "by_metric": checks}
            problems += prompt_problems + failures(gguf_type, checks, config)
            samples[gguf_type] = answers
            tracker.record(f"the {gguf_type} serving metrics", mlflow.log_metrics, {
                **{f"{gguf_type}/{k}": v for k, v in results["types"][gguf_type].items() if isinstance(v, (int, float))},
                **{f"{gguf_type}/{m}/{k}": v for m, c in checks.items() for k, v in c.items()}})
        results["passed"] = not problems
        results["failures"] = problems
        (out / "serve_check.json").write_text(json.dumps(results, indent=2))
        (out / "report.md").write_text(_report(results, tasks, reference, samples, config.evaluate.samples))
        tracker.record(f"the {STAGE} artifacts", mlflow.log_artifacts, str(out), artifact_path=STAGE)
        if problems:
            raise ServeCheckError("the served GGUF files do not answer as the merged model does: " + "; ".join(problems)
                                  + f" (the answers side by side: {STAGE}/report.md in the stage's MLflow run; relax "
                                  "serve_check's limits only if they are fine)")
        lineage.update(tracker.run_record())
        storage.write_manifest(out, STAGE, lineage, results)
    log.info("serve-check: %s", {t: {k: v for k, v in r.items() if k != "by_metric"} for t, r in results["types"].items()})
    return tracker.result(results, output)


def _report(results: dict[str, Any], tasks: list[dict[str, Any]], reference: list[str], samples: dict[str, list[str]],
            shown: int) -> str:
    lines = ["# Serving check", "", "Each GGUF file served by llama.cpp's server, asked the eval tasks through the "
             "openai client with the file's own chat template, compared with the merged model's answers.", ""]
    lines += ["| file | metric | tasks | served score | merged score | agreement | identical |", "|---" * 7 + "|"]
    for gguf_type, result in results["types"].items():
        lines += [f"| {gguf_type} | {m} | {c['tasks']} | {c['score']:.3f} | {c['reference_score']:.3f} | "
                  f"{c['agreement']:.3f} | {c['identical']:.3f} |" for m, c in result["by_metric"].items()]
    lines += ["", "| file | prompts rendered as trained | mean latency (s) | p95 latency (s) | tokens/s |", "|---" * 5 + "|"]
    lines += [f"| {t} | {r['same_prompt_tokens']:.3f} | {r['latency_mean_s']:.3f} | {r['latency_p95_s']:.3f} | "
              f"{r['tokens_per_second']:.1f} |" for t, r in results["types"].items()]
    if results["failures"]:
        lines += ["", "## Failed", "", *[f"- {f}" for f in results["failures"]]]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    lines += ["", "## Sample answers", "", "| prompt | merged | " + " | ".join(samples) + " |", "|---" * (len(samples) + 2) + "|"]
    for i, task in enumerate(tasks[:shown]):
        lines.append(f"| {cell(task['messages'][-1]['content'])} | {cell(reference[i])} | "
                     + " | ".join(cell(a[i]) for a in samples.values()) + " |")
    return "\n".join(lines) + "\n"
