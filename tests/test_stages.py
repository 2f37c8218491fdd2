"""Each training stage alone and the whole chain on the tiny model."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import EXAMPLES, alpaca_rows, assert_no_output, cli, make_config, preference_rows, write_jsonl
from safetensors.torch import load_file

from tuneforge import models, training
from tuneforge.chat_templates import CHATML
from tuneforge.config import BaseModelSettings, load_config
from tuneforge.pipelines import pipeline


def tuneforge(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data-prep output with SFT rows and preference pairs, shared by the stage tests."""
    tmp = tmp_path_factory.mktemp("prepared")
    sources = [write_jsonl(tmp / "sft.jsonl", alpaca_rows(40)), write_jsonl(tmp / "pref.jsonl", preference_rows(16))]
    config = make_config(tmp, sources)
    result = cli("stage", "data-prep", "--config", config, "--output", tmp / "data")
    assert result.exit_code == 0, result.stderr
    return config, tmp / "data"


def test_tiny_pipeline_through_kfp_local_with_tracking_and_cached_rerun(tmp_path):
    workdir = tmp_path / "work"
    args = ["run", EXAMPLES / "tiny.yaml", "--set", f"workdir={workdir}", "--pipeline-root", tmp_path / "kfp"]
    started = time.monotonic()
    result = tuneforge(*args)
    first_run = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    # DPO after a full SFT: the SFT model is re-saved by merge-sft and scored too
    stages = ["data-prep", "sft", "dpo", "merge-sft", "merge", "evaluate", "export-gguf", "serve-check", "register"]
    assert {k: v["status"] for k, v in summary["stages"].items()} == dict.fromkeys(stages, "succeeded")
    assert summary["winner"]["model"] in ("sft", "dpo") and summary["winner"]["why"]
    assert summary["metrics"]["candidate"]["eval_loss"] < summary["metrics"]["base"]["eval_loss"] - 1.0
    # One line per task on the console, the tasks' raw output in the run's log file.
    assert re.search(r"✓ sft +succeeded +\d+ s", result.stderr) and "key metric" in result.stderr
    assert f"task logs: {summary['log']}" in result.stderr
    assert "Task 'sft' finished with status" in Path(summary["log"]).read_text().replace("\x1b[96m", "").replace("\x1b[0m", "")
    assert summary["registered_model"]["aliases"] == ["challenger", "champion"]
    # The win over the base model is larger than the noise of the held-out rows, paired row by row.
    assert any(r.startswith("eval_loss") and "vs base" in r and "beats it by more than 0.0 plus the noise of" in r
               for r in summary["registered_model"]["decision"]["reasons"]), summary["registered_model"]["decision"]
    # The guide's checklist, ticked from what the stages measured; every item carries its evidence.
    checklist = {i["key"]: i for i in summary["checklist"]}
    assert {k: i["status"] for k, i in checklist.items()} == {
        "baseline_evaluated": "pass", "chat_template_the_same_data_prep_evaluate": "pass",
        "completion_only_loss_mask": "pass", "memory_plan_sft": "n/a", "memory_plan_dpo": "n/a",
        "gradient_checkpointing_chosen": "pass", "eval_loss_watched": "pass", "adapter_saved_and_loaded_back": "pass",
        "merged_model_tested_at_inference": "pass", "chat_template_the_same_in_the_gguf_files": "pass",
        "gguf_files_verified_in_llama_cpp": "pass", "served_model_answers_like_the_merged_one": "pass"}, summary["checklist"]
    assert re.fullmatch(r"[\d.]+% of the tokens of a sample batch are trained on", checklist["completion_only_loss_mask"]["evidence"])
    assert "trained on the CPU; the plan for a GPU is" in checklist["memory_plan_sft"]["evidence"]
    assert "dpo: saved weights equal the trained ones (max diff 0)" in checklist["adapter_saved_and_loaded_back"]["evidence"]
    assert "q8_0: tokenizer agreement 1.0" in checklist["gguf_files_verified_in_llama_cpp"]["evidence"]
    # The q8_0 file, served by llama.cpp and asked through the openai client, answers as the merged model did.
    assert summary["serving"]["q8_0"]["agreement"]["exact_match"] >= 0.5
    assert "q8_0 through llama.cpp's server: exact_match score" in checklist["served_model_answers_like_the_merged_one"]["evidence"]

    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"  # closed by the pipeline's exit handler
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["tuneforge.stage"]: r for r in children}
    assert set(by_stage) == set(stages) - {"merge-sft"}  # both merges are the merge stage
    sft = by_stage["sft"]
    assert sft.data.params["sft.method"] == "full" and sft.data.params["base_model.source"] == "tiny-llama"
    assert len(client.get_metric_history(sft.info.run_id, "sft/loss")) >= 3
    assert sft.data.tags["lineage.data_sha256"] == by_stage["data-prep"].data.tags["lineage.data_sha256"]
    assert sft.data.tags["lineage.chat_template_sha256"] and sft.data.tags["lineage.code_version"]
    assert "dpo/rewards/accuracies" in by_stage["dpo"].data.metrics
    assert by_stage["export-gguf"].data.metrics["q8_0/tokenizer_agreement"] == 1.0
    evaluation = by_stage["evaluate"]
    assert {"base/eval_loss", "sft/task_exact_match", "dpo/preference_accuracy"} <= set(evaluation.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluate")}
    assert {"evaluate/report.md", "evaluate/before_after.png", "evaluate/loss_curves.png"} <= artifacts
    assert evaluation.data.tags["checklist.completion_only_loss_mask"] == "pass"
    register = by_stage["register"]
    assert {k: v for k, v in register.data.tags.items() if k.startswith("checklist.")} == {
        f"checklist.{k}": i["status"] for k, i in checklist.items()}
    assert "checklist.md" in {a.path.split("/")[-1] for a in client.list_artifacts(register.info.run_id, "register")}
    report = Path(summary["artifacts"]["evaluate"], "report.md").read_text()
    assert "## The guide's checklist" in report and "| ✓ | eval loss watched | sft eval loss at" in report
    assert re.search(r"\| eval_loss \|(?: [\d.]+ \|)+ -[\d.]+ ± [\d.]+ \|", report), report  # base, sft, dpo
    # tiny.yaml's learning rate is outside the table on purpose; the report says so.
    assert "sft.learning_rate is 0.003, outside the guide's range for full fine-tuning" in report

    # Nothing changed: every stage comes from KFP's cache; registration runs again and registers nothing.
    started = time.monotonic()
    again = tuneforge(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert {k: v["status"] for k, v in rerun["stages"].items()} == {**dict.fromkeys(stages[:-1], "cached"), "register": "succeeded"}
    assert {k: v["output"] for k, v in rerun["stages"].items() if k != "register"} == {
        k: v["output"] for k, v in summary["stages"].items() if k != "register"}
    assert time.monotonic() - started < first_run / 2
    assert rerun["registered_model"]["outcome"] == "unchanged: version 1"
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-extract'")] == ["1"]

    # A later stage's setting changed: the stages before it come from the cache, it and the ones after it run; the
    # champion (version 1) is re-scored on the same held-out data for the gate.
    changed = tuneforge(*args, "--set", "dpo.beta=0.3")
    assert changed.returncode == 0, changed.stderr[-3000:]
    third = json.loads(changed.stdout.strip().splitlines()[-1])
    assert {k: v["status"] for k, v in third["stages"].items()} == {
        **dict.fromkeys(stages, "succeeded"), "data-prep": "cached", "sft": "cached", "merge-sft": "cached"}
    assert third["metrics"]["champion"]["eval_loss"] == pytest.approx(summary["metrics"]["candidate"]["eval_loss"], abs=1e-4)
    assert any("champion v1 (re-scored on this run's eval split)" in r for r in third["registered_model"]["decision"]["reasons"])


@pytest.mark.parametrize(
    "sft_settings, check",
    [
        ({"method": "lora", "lora": {"r": 4, "alpha": 8}}, lambda a: a["r"] == 4 and "q_proj" in a["target_modules"]),
        ({"method": "lora", "lora": {"use_dora": True, "use_rslora": True}}, lambda a: a["use_dora"] and a["use_rslora"]),
        ({"method": "qlora"}, lambda a: a["peft_type"] == "LORA"),
        ({"method": "lora", "packing": True}, lambda a: True),
        ({"method": "lora", "gradient_checkpointing": True, "early_stopping_patience": 1, "eval_steps": 2}, lambda a: True),
    ],
    ids=["lora", "dora-rslora", "qlora", "packing", "checkpointing-early-stopping"],
)
def test_sft_methods_then_merge(prepared, tmp_path, sft_settings, check):
    config, data = prepared
    overrides = [f"--set=sft.{k}={json.dumps(v)}" for k, v in sft_settings.items()]
    result = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft", *overrides)
    assert result.exit_code == 0, result.stderr or result.exception
    adapter = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-llama" and check(adapter)
    # LoRA B matrices start at zero: non-zero ones prove gradients reached the adapter (QLoRA on CPU included).
    weights = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["lineage"]["kind"] == "adapter" and manifest["metrics"]["steps"] == 4
    # backend: auto (the default) reports what it chose and why.
    assert manifest["lineage"]["backend"] == "hf" and "auto: " in manifest["lineage"]["backend_reason"]
    if sft_settings.get("packing"):  # on the CPU each packed example is attended alone
        assert (manifest["lineage"]["batching"], manifest["lineage"]["attention"]) == ("packed", "tuneforge_rowwise")
    assert not (tmp_path / "sft.checkpoints").exists()
    merged = cli("stage", "merge", "--config", config, "--input", f"model={tmp_path / 'sft'}", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr or merged.exception
    metrics = json.loads((tmp_path / "merged" / "manifest.json").read_text())["metrics"]
    assert metrics["merge_max_abs_logit_diff"] < 1e-3


def test_dpo_after_lora_sft_uses_the_sft_adapter_as_reference(prepared, tmp_path):
    config, data = prepared
    sft = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft", "--set", "sft.method=lora")
    assert sft.exit_code == 0, sft.stderr
    dpo = cli("stage", "dpo", "--config", config, "--input", f"data={data}", "--input", f"model={tmp_path / 'sft'}", "--output", tmp_path / "dpo")
    assert dpo.exit_code == 0, dpo.stderr or dpo.exception
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    assert manifest["lineage"]["adapter_base"] == "base_model" and "eval_rewards/margins" in manifest["metrics"]
    assert not (tmp_path / "dpo" / "ref").exists()  # only the trained adapter is saved


@pytest.fixture(scope="module")
def sft_output(prepared, tmp_path_factory):
    config, data = prepared
    folder = tmp_path_factory.mktemp("sft") / "sft"
    result = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", folder)
    assert result.exit_code == 0, result.stderr
    return folder


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo", "cpo"])
def test_preference_methods_train_and_go_through_merge_evaluate_register(prepared, sft_output, tmp_path, method):
    config, data = prepared
    # Its own workdir, so its own registry: each method's model is the first one registered.
    common = ["--config", config, "--set", f"dpo.method={method}", "--set", "dpo.enabled=true",
              "--set", f"workdir={tmp_path / 'work'}"]
    trained = cli("stage", "dpo", *common, "--input", f"data={data}", "--input", f"model={sft_output}",
                  "--output", tmp_path / "dpo", "--set", "dpo.max_steps=3", "--set", "dpo.logging_steps=1")
    assert trained.exit_code == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    lineage = manifest["lineage"]
    assert lineage["preference_method"] == method and lineage["adapter_base"] == "sft"
    assert lineage["reference_logps"] == ("in every step" if method == "kto" else f"none: {method} has no reference model")
    assert lineage["beta"] == (2.0 if method == "simpo" else 0.1)
    if method == "kto":  # each of the 14 training pairs is a good and a bad answer: equal weights
        assert (lineage["kto_good_answers"], lineage["kto_bad_answers"], lineage["desirable_weight"]) == (14, 14, 1.0)
    losses = [e["loss"] for e in json.loads((tmp_path / "dpo" / "train_history.json").read_text()) if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The new adapter's B matrices start at zero: trained ones are not.
    adapter = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)

    merged = cli("stage", "merge", *common, "--input", f"model={tmp_path / 'dpo'}", "--input", f"base={sft_output}",
                 "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr[-3000:]
    evaluated = cli("stage", "evaluate", *common, "--input", f"data={data}", "--input", f"model={tmp_path / 'merged'}",
                    "--input", f"sft={sft_output}", "--input", f"dpo={tmp_path / 'dpo'}", "--output", tmp_path / "evaluate")
    assert evaluated.exit_code == 0, evaluated.stderr[-3000:]
    scores = json.loads(evaluated.stdout)["metrics"]
    assert 0 <= scores["candidate"]["preference_accuracy"] <= 1
    registered = cli("stage", "register", *common, "--input", f"evaluation={tmp_path / 'evaluate'}",
                     "--input", f"model={tmp_path / 'merged'}", "--output", tmp_path / "register")
    assert registered.exit_code == 0, registered.stderr[-3000:]
    decision = json.loads(registered.stdout)["metrics"]["decision"]
    assert decision["promoted"] is True, decision


GRPO_REWARDS = "grpo.rewards=[{type: length, max_chars: 8}, {type: regex, pattern: '[aeiou]', weight: 0.5}, {type: exact}]"


def test_grpo_trains_on_rewards_and_goes_through_merge_evaluate_register(prepared, sft_output, tmp_path):
    config, data = prepared
    # The tiny model's answers are random tokens: rewards that vary between them (length, a regex) give GRPO a signal.
    common = ["--config", config, "--set", "grpo.enabled=true", "--set", f"workdir={tmp_path / 'work'}",
              "--set", GRPO_REWARDS]
    trained = cli("stage", "grpo", *common, "--input", f"data={data}", "--input", f"model={sft_output}",
                  "--output", tmp_path / "grpo", "--set", "grpo.max_steps=3", "--set", "grpo.max_completion_length=12")
    assert trained.exit_code == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    assert manifest["lineage"]["adapter_base"] == "sft" and manifest["lineage"]["starting_model"] == "sft"
    assert manifest["lineage"]["prompts"] == 36 and manifest["lineage"]["max_completion_length"] == 12
    history = [e for e in json.loads((tmp_path / "grpo" / "train_history.json").read_text()) if "reward" in e]
    assert [e["step"] for e in history] == [1, 2, 3]
    for entry in history:  # per step: each reward, the total, the KL and the answers' length
        assert {"rewards/length/mean", "rewards/regex/mean", "rewards/exact/mean", "kl", "completions/mean_length"} <= set(entry)
        assert math.isfinite(entry["loss"]) and -1e9 < entry["reward"] <= 1.5
    assert manifest["metrics"]["reward_first_step"] == history[0]["reward"]
    assert (tmp_path / "grpo" / "rewards.png").stat().st_size > 10_000
    adapter = load_file(tmp_path / "grpo" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained: B starts at zero

    merged = cli("stage", "merge", *common, "--input", f"model={tmp_path / 'grpo'}", "--input", f"base={sft_output}",
                 "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr[-3000:]
    evaluated = cli("stage", "evaluate", *common, "--input", f"data={data}", "--input", f"model={tmp_path / 'merged'}",
                    "--input", f"sft={sft_output}", "--input", f"grpo={tmp_path / 'grpo'}", "--output", tmp_path / "evaluate")
    assert evaluated.exit_code == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["metrics"]["trained_by"] == "grpo"
    registered = cli("stage", "register", *common, "--input", f"evaluation={tmp_path / 'evaluate'}",
                     "--input", f"model={tmp_path / 'merged'}", "--output", tmp_path / "register")
    assert registered.exit_code == 0, registered.stderr[-3000:]
    assert json.loads(registered.stdout)["metrics"]["decision"]["promoted"] is True


def test_grpo_starts_from_the_base_model_without_sft(prepared, tmp_path):
    config, data = prepared
    trained = cli("stage", "grpo", "--config", config, "--set", "grpo.enabled=true", "--set", GRPO_REWARDS,
                  "--input", f"data={data}", "--output", tmp_path / "grpo", "--set", "grpo.max_steps=2")
    assert trained.exit_code == 0, trained.stderr[-3000:]
    lineage = json.loads((tmp_path / "grpo" / "manifest.json").read_text())["lineage"]
    assert lineage["starting_model"] == "base" and lineage["adapter_base"] == "base_model"
    # No max_completion_length set: twice the longest reference answer, in tokens.
    assert lineage["max_completion_length"] >= 16


def test_a_reference_free_method_trains_from_the_base_model_without_sft(prepared, tmp_path):
    config, data = prepared
    common = ["--config", config, "--set", "sft.enabled=false", "--set", "dpo.enabled=true", "--set", "dpo.method=simpo"]
    trained = cli("stage", "dpo", *common, "--input", f"data={data}", "--output", tmp_path / "dpo",
                  "--set", "dpo.max_steps=2")
    assert trained.exit_code == 0, trained.stderr[-3000:]
    lineage = json.loads((tmp_path / "dpo" / "manifest.json").read_text())["lineage"]
    assert lineage["adapter_base"] == "base_model" and lineage["reference_logps"] == "none: simpo has no reference model"
    merged = cli("stage", "merge", *common, "--input", f"model={tmp_path / 'dpo'}", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr[-3000:]
    # The chat template is data-prep's, as an sft output would carry it: evaluate accepts the model.
    evaluated = cli("stage", "evaluate", *common, "--input", f"data={data}", "--input", f"model={tmp_path / 'merged'}",
                    "--input", f"dpo={tmp_path / 'dpo'}", "--output", tmp_path / "evaluate")
    assert evaluated.exit_code == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["metrics"]["trained_by"] == "dpo"
    # DPO itself scores against the SFT model: without one it says what to give it.
    refused = cli("stage", "dpo", "--config", config, "--set", "dpo.enabled=true", "--input", f"data={data}",
                  "--output", tmp_path / "dpo2")
    assert refused.exit_code == 2 and "dpo.method dpo scores against the SFT model" in refused.stderr


def test_kto_trains_on_unpaired_rows_alone(tmp_path):
    unpaired = [{"prompt": f"Extract the name as JSON.\n\nPerson{i} lives in City{i}.",
                 "completion": json.dumps({"name": f"Person{i}"}) if i % 3 else f"The name is Person{i}.", "label": i % 3 > 0}
                for i in range(24)]
    config = make_config(tmp_path, [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(12)),
                                    write_jsonl(tmp_path / "unpaired.jsonl", unpaired)],
                         dpo={"enabled": True, "method": "kto", "max_steps": 2})
    data, sft = tmp_path / "data", tmp_path / "sft"
    for stage, output, inputs in [("data-prep", data, []), ("sft", sft, [f"--input=data={data}"]),
                                  ("dpo", tmp_path / "dpo", [f"--input=data={data}", f"--input=model={sft}"])]:
        result = cli("stage", stage, "--config", config, *inputs, "--output", output)
        assert result.exit_code == 0, (stage, result.stderr[-3000:])
    lineage = json.loads((tmp_path / "dpo" / "manifest.json").read_text())["lineage"]
    # 2 of 3 answers are good: the bad ones weigh twice as much, as KTO's paper balances them.
    good, bad = lineage["kto_good_answers"], lineage["kto_bad_answers"]
    assert good + bad == json.loads((tmp_path / "data" / "manifest.json").read_text())["metrics"]["unpaired_train"]
    assert good > bad and lineage["undesirable_weight"] == pytest.approx(good / bad) and lineage["desirable_weight"] == 1.0


def test_the_likelihood_guard_stops_dpo_that_pushes_the_chosen_answers_down(prepared, tmp_path):
    """A learning rate far too high for DPO drives the chosen answers' log-probability down: the guard stops the run at
    the first evaluation past the margin, says so in the log, the manifest and MLflow; RPO's NLL term holds them up."""
    config, data = prepared
    sft = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft", "--set", "sft.method=lora")
    assert sft.exit_code == 0, sft.stderr
    common = ["--config", config, "--input", f"data={data}", "--input", f"model={tmp_path / 'sft'}",
              "--set", "dpo.learning_rate=0.05", "--set", "dpo.max_steps=12", "--set", "dpo.eval_steps=2"]
    guarded = tuneforge("stage", "dpo", *common, "--output", tmp_path / "guarded", "--set", "dpo.max_chosen_logp_drop=2")
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    guard = json.loads((tmp_path / "guarded" / "manifest.json").read_text())["lineage"]["likelihood_guard"]
    assert guard["tripped"] and guard["tripped"]["drop"] > 2 and guard["tripped"]["step"] < 12, guard
    assert all(drop <= 2 for step, drop in guard["drops"] if step < guard["tripped"]["step"])
    assert guard["kept_step"] == (guard["tripped"]["step"] - 2 if guard["tripped"]["step"] > 2 else None)
    assert "likelihood guard: at step" in guarded.stderr and guard["summary"].startswith("tripped at step")
    steps = json.loads((tmp_path / "guarded" / "manifest.json").read_text())["metrics"]["steps"]
    assert steps == guard["tripped"]["step"]  # stopped there

    free = [*common, "--set", "dpo.max_chosen_logp_drop=null"]
    plain = cli("stage", "dpo", *free, "--output", tmp_path / "plain")
    rpo = cli("stage", "dpo", *free, "--output", tmp_path / "rpo", "--set", "dpo.rpo_alpha=1.0")
    assert plain.exit_code == 0 and rpo.exit_code == 0, (plain.stderr, rpo.stderr)
    chosen = {name: json.loads((tmp_path / name / "manifest.json").read_text())["metrics"]["eval_rewards/chosen"]
              for name in ("plain", "rpo")}
    assert chosen["rpo"] > chosen["plain"], chosen


def test_a_run_that_breaks_two_checklist_items_shows_them_failed(prepared, tmp_path):
    """The prompt trained on (sft.loss_on: all) and no eval loss during training: both items fail, with evidence; data
    without eval tasks leaves the merged model untested at inference; the rest still pass."""
    config, data = prepared
    sft = cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
              "--set", "sft.method=lora", "--set", "sft.loss_on=all", "--set", "sft.eval_steps=100")
    assert sft.exit_code == 0, sft.stderr or sft.exception
    assert cli("stage", "merge", "--config", config, "--input", f"model={tmp_path / 'sft'}", "--output", tmp_path / "merged").exit_code == 0
    result = cli("stage", "evaluate", "--config", config, "--input", f"data={data}", "--input", f"model={tmp_path / 'merged'}",
                 "--input", f"sft={tmp_path / 'sft'}", "--output", tmp_path / "eval")
    assert result.exit_code == 0, result.stderr or result.exception
    items = {i["key"]: i for i in json.loads((tmp_path / "eval" / "metrics.json").read_text())["checklist"]}
    assert {k for k, i in items.items() if i["status"] == "fail"} == {"completion_only_loss_mask", "eval_loss_watched",
                                                                       "merged_model_tested_at_inference"}
    assert "set data.eval_tasks" in items["merged_model_tested_at_inference"]["evidence"]
    assert "100.0% of the tokens" in items["completion_only_loss_mask"]["evidence"]
    assert "sft.loss_on: all" in items["completion_only_loss_mask"]["evidence"]
    assert "at the end only" in items["eval_loss_watched"]["evidence"] and "sft.eval_steps" in items["eval_loss_watched"]["evidence"]
    assert items["adapter_saved_and_loaded_back"]["status"] == "pass"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| ✗ | completion-only loss mask |" in report and "| ✗ | eval loss watched |" in report


def test_sft_and_dpo_train_without_an_eval_split(tmp_path):
    sources = [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(16)), write_jsonl(tmp_path / "pref.jsonl", preference_rows(8))]
    config = make_config(tmp_path, sources, data={"eval_fraction": 0})
    assert cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data").exit_code == 0
    sft = cli("stage", "sft", "--config", config, "--input", f"data={tmp_path / 'data'}", "--output", tmp_path / "sft",
              "--set", "sft.method=lora", "--set", "sft.max_steps=2")
    assert sft.exit_code == 0, sft.stderr or sft.exception
    dpo = cli("stage", "dpo", "--config", config, "--input", f"data={tmp_path / 'data'}", "--input", f"model={tmp_path / 'sft'}",
              "--output", tmp_path / "dpo", "--set", "dpo.max_steps=2")
    assert dpo.exit_code == 0, dpo.stderr or dpo.exception
    for stage in ("sft", "dpo"):
        metrics = json.loads((tmp_path / stage / "manifest.json").read_text())["metrics"]
        assert "train_loss" in metrics and not any(k.startswith("eval") for k in metrics), metrics


def test_batching_on_rows_of_varied_length(tmp_path):
    """160 rows of 1 to 60 words: on the CPU auto makes padding-free batches under rowwise attention (no padding) that
    train exactly like padded ones, which run their rows' shared prefix once (same rows per step: same losses); grouped batches have far less padding than padded
    ones; DPO computes each prompt once, with the same losses as TRL's two rows."""
    words = [1 + (i * 37) % 60 for i in range(160)]  # enough rows for the sampler to sort groups of 40
    sft_rows = [{"instruction": f"Repeat the words of line {i}.", "input": " ".join(["word"] * n),
                 "output": " ".join(["word"] * n)} for i, n in enumerate(words)]
    pairs = [{"prompt": f"Repeat the words of line {i}. " + " ".join(["word"] * n), "chosen": " ".join(["word"] * n),
              "rejected": " ".join(["word"] * (n + 5))} for i, n in enumerate(words[:80])]
    sources = [write_jsonl(tmp_path / "sft.jsonl", sft_rows), write_jsonl(tmp_path / "pref.jsonl", pairs)]
    config = make_config(tmp_path, sources, sft={"method": "lora", "batch_size": 8, "max_steps": 4, "logging_steps": 1},
                         dpo={"batch_size": 4, "max_steps": 3, "logging_steps": 1, "max_chosen_logp_drop": None},
                         data={"eval_fraction": 0, "max_length": 256})
    data = tmp_path / "data"
    assert cli("stage", "data-prep", "--config", config, "--output", data).exit_code == 0

    def stage(name: str, *overrides: str, inputs=()) -> dict:
        output = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        result = cli("stage", name, "--config", config, "--input", f"data={data}", *inputs, "--output", output,
                     *[f"--set={o}" for o in overrides])
        assert result.exit_code == 0, result.stderr or result.exception
        manifest = json.loads((output / "manifest.json").read_text())
        history = json.loads((output / "train_history.json").read_text())
        return {"lineage": manifest["lineage"], "metrics": manifest["metrics"], "output": output,
                "losses": [e["loss"] for e in history if "loss" in e]}

    auto, padded, grouped = stage("sft"), stage("sft", "sft.batching=padded"), stage("sft", "sft.batching=grouped")
    assert (auto["lineage"]["batching"], auto["lineage"]["attention"]) == ("padding_free", "tuneforge_rowwise")
    assert "each row attended alone" in auto["lineage"]["batching_reason"], auto["lineage"]["batching_reason"]
    assert padded["lineage"]["batching"] == "padded" and grouped["lineage"]["batching"] == "grouped"
    assert padded["metrics"]["padding_share"] > 0.3 and grouped["metrics"]["padding_share"] < padded["metrics"]["padding_share"] / 2
    assert auto["metrics"]["padding_share"] == 0
    assert len(auto["losses"]) == 4 and auto["losses"] == pytest.approx(padded["losses"], abs=1e-4)
    # padded batches run the prefix their rows share once (the padding-free ones have no rows to share it): same losses
    assert padded["lineage"]["shared_prefix"].startswith("on:") and padded["metrics"]["shared_prefix_share"] > 0.03
    assert auto["lineage"]["shared_prefix"].startswith("padding-free") and "shared_prefix_share" not in auto["metrics"]

    sft = ["--input", f"model={padded['output']}"]
    shared, two_rows = stage("dpo", "dpo.batching=padded", inputs=sft), stage(
        "dpo", "dpo.batching=padded", "dpo.shared_prompt=false", inputs=sft)
    assert shared["lineage"]["shared_prompt"].startswith("on:") and two_rows["lineage"]["shared_prompt"] == "dpo.shared_prompt: false"
    assert len(shared["losses"]) == 3 and shared["losses"] == pytest.approx(two_rows["losses"], abs=1e-4)
    grouped = stage("dpo", inputs=sft)
    assert grouped["lineage"]["batching"] == "grouped" and grouped["lineage"]["reference_logps"] == "in every step"
    assert grouped["metrics"]["padding_share"] < shared["metrics"]["padding_share"]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_unsloth_backend_says_why_it_cannot_run(prepared, tmp_path, stage):
    config, data = prepared
    inputs = ["--input", f"data={data}"] + (["--input", f"model={tmp_path}"] if stage == "dpo" else [])
    result = cli("stage", stage, "--config", config, *inputs, "--output", tmp_path / stage, "--set", f"{stage}.backend=unsloth")
    assert result.exit_code == 2
    assert f"{stage}.backend: unsloth cannot run here: the unsloth package is not installed" in result.stderr
    assert f"set {stage}.backend: hf" in result.stderr
    assert_no_output(tmp_path / stage)


def test_all_ones_loss_mask_fails_before_training(tmp_path):
    config = make_config(tmp_path, [write_jsonl(tmp_path / "t.jsonl", [{"text": f"plain text {i}"} for i in range(12)])])
    assert cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data").exit_code == 0
    result = cli("stage", "sft", "--config", config, "--input", f"data={tmp_path / 'data'}", "--output", tmp_path / "sft")
    assert result.exit_code == 2 and "loss mask is all ones" in result.stderr and "sft.loss_on: all" in result.stderr
    assert_no_output(tmp_path / "sft")


def test_stage_inputs_are_checked(prepared, tmp_path):
    config, data = prepared
    missing = cli("stage", "merge", "--config", config, "--output", tmp_path / "o")
    assert missing.exit_code == 2 and "needs --input model=PATH" in missing.stderr
    # dpo's model is optional (a reference-free method starts from the base model); DPO itself says what it needs.
    no_sft = cli("stage", "dpo", "--config", config, "--input", f"data={data}", "--output", tmp_path / "o")
    assert no_sft.exit_code == 2 and "dpo.method dpo scores against the SFT model" in no_sft.stderr
    partial = tmp_path / "half"
    partial.mkdir()
    result = cli("stage", "sft", "--config", config, "--input", f"data={partial}", "--output", tmp_path / "o")
    assert result.exit_code == 2 and "not a complete tuneforge stage output" in result.stderr
    wrong = cli("stage", "merge", "--config", config, "--input", f"model={data}", "--output", tmp_path / "o")
    assert wrong.exit_code == 2 and "is the output of stage 'data-prep', expected sft or dpo or grpo" in wrong.stderr
    assert cli("stage", "train", "--config", config, "--output", tmp_path / "o").exit_code == 2


def test_failed_pipeline_reports_the_stage_and_exits_non_zero(tmp_path):
    config = make_config(tmp_path, [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(12))], dpo={"enabled": True})
    result = tuneforge("run", config, "--pipeline-root", tmp_path / "kfp")
    assert result.returncode == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # dpo is enabled and there is no preference pair: data-prep says so, per source, before any training.
    assert summary["status"] == "failed" and summary["stages"]["data-prep"]["status"] == "failed"
    assert re.search(r"✗ data-prep +failed .*DataError: data-prep: no preference pairs to train DPO on \(dpo.enabled is true\)",
                     result.stderr), result.stderr
    assert "sft" not in summary["stages"]
    run = mlflow.MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FAILED"  # the exit handler marked the pipeline's MLflow run


def test_a_candidate_that_does_not_beat_the_base_says_why_nothing_is_registered(tmp_path):
    """SFT at a learning rate too small to matter: evaluate's gate against the base model fails, export and register
    are skipped, and the summary and the console say why instead of leaving register out without a word."""
    config = make_config(tmp_path, [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(24))],
                         sft={"learning_rate": 1e-12, "max_steps": 2}, export={"enabled": False})
    result = tuneforge("run", config, "--pipeline-root", tmp_path / "kfp")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and "register" not in summary["stages"] and "registered_model" not in summary
    assert summary["not_registered"].startswith("the candidate does not beat the base model: eval_loss "), summary
    assert summary["skipped"] == {"register": summary["not_registered"]}
    assert re.search(r"register +skipped +the candidate does not beat the base model", result.stderr), result.stderr

    # A task that fails after its stage wrote the output (kfp.local records success in executor_output.json) is a
    # failed stage and a failed run, not a finished one.
    (Path(summary["run_folder"]) / "evaluate" / "executor_output.json").unlink()
    again = pipeline.summarize(load_config(config), Path(summary["run_folder"]))
    assert again["status"] == "failed" and again["stages"]["evaluate"]["status"] == "failed"


def kill_and_resume(args, output, save_steps, kill_after):
    """Start a stage, SIGKILL it once checkpoint-KILL_AFTER exists, run it again; return how many steps the kill
    lost (steps done at the kill minus the step resumed from) and the finished stage's result."""
    checkpoints = output.with_name(output.name + ".checkpoints")
    process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (checkpoints / f"checkpoint-{kill_after}").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    time.sleep(0.3)  # a little further into training than the checkpoint
    process.send_signal(signal.SIGKILL)
    _, killed_log = process.communicate()
    assert not output.exists()
    done_at_kill = len(re.findall(r"\{'loss': ", killed_log))  # logging_steps is 1
    newest = Path(training.last_complete_checkpoint(checkpoints))
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in newest.iterdir()}
    resumed = tuneforge(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_from = int(re.search(r"resuming from \S*checkpoint-(\d+)", resumed.stderr).group(1))
    lost = done_at_kill - resumed_from
    assert 0 <= lost <= save_steps, (done_at_kill, resumed_from)
    return lost, json.loads(resumed.stdout.strip().splitlines()[-1])


def assert_same_training(resumed_dir, reference_dir, after_step):
    """Resumed training follows the uninterrupted run step for step (same batches, optimizer, schedule, RNG)."""
    resumed = {e["step"]: e["loss"] for e in json.loads((resumed_dir / "train_history.json").read_text()) if "loss" in e}
    reference = {e["step"]: e["loss"] for e in json.loads((reference_dir / "train_history.json").read_text()) if "loss" in e}
    steps = [s for s in reference if s > after_step]
    assert steps and all(abs(resumed[s] - reference[s]) < 1e-4 for s in steps), [(s, resumed[s], reference[s]) for s in steps]


def test_killed_sft_resumes_from_its_last_checkpoint(prepared, tmp_path):
    config, data = prepared
    common = ["--config", config, "--input", f"data={data}", "--set", "sft.max_steps=200", "--set", "sft.save_steps=10",
              "--set", "sft.batch_size=2", "--set", "sft.logging_steps=1"]
    lost, result = kill_and_resume(["stage", "sft", *common, "--output", tmp_path / "sft"], tmp_path / "sft", 10, 20)
    assert result["metrics"]["steps"] == 200
    assert not (tmp_path / "sft.checkpoints").exists()  # removed once the stage succeeded
    reference = tuneforge("stage", "sft", *common, "--output", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_training(tmp_path / "sft", tmp_path / "reference", after_step=30)
    print(f"sft: a kill lost {lost} steps (save_steps 10)")


def test_killed_dpo_resumes_from_its_last_checkpoint(prepared, tmp_path):
    config, data = prepared
    assert cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft",
               "--set", "sft.method=lora").exit_code == 0
    common = ["--config", config, "--input", f"data={data}", "--input", f"model={tmp_path / 'sft'}",
              "--set", "dpo.max_steps=60", "--set", "dpo.save_steps=10", "--set", "dpo.batch_size=2",
              "--set", "dpo.logging_steps=1"]
    lost, result = kill_and_resume(["stage", "dpo", *common, "--output", tmp_path / "dpo"], tmp_path / "dpo", 10, 20)
    assert result["metrics"]["steps"] == 60
    reference = tuneforge("stage", "dpo", *common, "--output", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_training(tmp_path / "dpo", tmp_path / "reference", after_step=30)
    print(f"dpo: a kill lost {lost} steps (save_steps 10)")


def test_merge_proof_failure_leaves_nothing(prepared, tmp_path):
    config, data = prepared
    assert cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft", "--set", "sft.method=lora").exit_code == 0
    result = cli("stage", "merge", "--config", config, "--input", f"model={tmp_path / 'sft'}", "--output", tmp_path / "merged", "--set", "merge.tolerance=1e-12")
    assert result.exit_code == 2 and "merge check failed" in result.stderr and "merge.tolerance=1e-12" in result.stderr
    assert_no_output(tmp_path / "merged")


def test_evaluate_refuses_another_chat_template(prepared, tmp_path):
    config, data = prepared
    assert cli("stage", "sft", "--config", config, "--input", f"data={data}", "--output", tmp_path / "sft").exit_code == 0
    assert cli("stage", "merge", "--config", config, "--input", f"model={tmp_path / 'sft'}", "--output", tmp_path / "merged").exit_code == 0
    other_template = json.dumps(CHATML.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + '\n\n'"))  # a blank line between turns
    other = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data2",
                "--set", f"data.chat_template={other_template}", "--set", "data.max_length=512")
    assert other.exit_code == 0, other.stderr
    result = cli("stage", "evaluate", "--config", config, "--input", f"data={tmp_path / 'data2'}", "--input", f"model={tmp_path / 'merged'}", "--output", tmp_path / "eval")
    assert result.exit_code == 2 and "chat template mismatch" in result.stderr
    assert_no_output(tmp_path / "eval")


def test_eval_tasks_with_answers_longer_than_the_generation_are_refused(prepared, sft_output, tmp_path):
    config, _ = prepared
    answer = " ".join(f"word{i}" for i in range(30))
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Say it.", "expected": "yes"},
                                                   {"prompt": "List them.", "expected": answer}])
    data = tmp_path / "data"
    prepared_again = cli("stage", "data-prep", "--config", config, "--output", data, "--set", f"data.eval_tasks={tasks}")
    assert prepared_again.exit_code == 0, prepared_again.stderr
    assert cli("stage", "merge", "--config", config, "--input", f"model={sft_output}", "--output", tmp_path / "merged").exit_code == 0
    needed = len(models.load_tokenizer(str(tmp_path / "merged"), BaseModelSettings(source="tiny-llama"))(
        answer, add_special_tokens=False)["input_ids"])

    def evaluate(limit):
        return cli("stage", "evaluate", "--config", config, "--input", f"data={data}", "--input",
                   f"model={tmp_path / 'merged'}", "--output", tmp_path / f"eval{limit}", "--set",
                   f"evaluate.max_new_tokens={limit}", "--set", f"data.eval_tasks={tasks}")

    refused = evaluate(needed - 1)
    assert refused.exit_code == 2
    message = " ".join(refused.stderr.split())
    assert f"evaluate.max_new_tokens is {needed - 1}, and 1 of the 2 eval tasks of {tasks}" in message
    assert f"set evaluate.max_new_tokens: {needed} or more" in message
    assert_no_output(tmp_path / f"eval{needed - 1}")
    assert evaluate(needed).exit_code == 0


def test_two_configs_in_one_process_each_log_to_their_own_store(tmp_path):
    """MLflow's set_tracking_uri exports the URI to the environment; the second workdir must not inherit the first's."""
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        config = make_config(folder, [write_jsonl(folder / "sft.jsonl", alpaca_rows(8))], data={"eval_fraction": 0})
        assert cli("stage", "data-prep", "--config", config, "--output", folder / "data").exit_code == 0
        assert (folder / "work" / "mlflow.db").exists(), name
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_mlflow_tracking_uri_from_the_environment_is_respected(prepared, tmp_path, monkeypatch):
    config, _ = prepared
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data")
    assert result.exit_code == 0, result.stderr
    run_id = json.loads((tmp_path / "data" / "manifest.json").read_text())["lineage"]["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.tags["tuneforge.stage"] == "data-prep" and run.data.metrics["sft_train"] > 0


def test_a_user_error_is_not_retried_and_a_transient_one_is(tmp_path, monkeypatch):
    """What a KFP retry of a task meets: a user error left a marker, so the retry stops at once with it; an
    unreachable server did not, so the retry does the work again."""
    from tuneforge.errors import DataError, SetupError, TrackingError
    from tuneforge.pipelines.stage_runner import run_stage

    config = make_config(tmp_path, [tmp_path / "missing.jsonl"])
    config_json = json.dumps(yaml.safe_load(config.read_text()))
    output = tmp_path / "task" / "data"
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        run_stage("data-prep", config_json, {}, str(output))
    write_jsonl(tmp_path / "missing.jsonl", alpaca_rows(8))  # even fixed, this run's retry repeats the verdict
    started = time.monotonic()
    with pytest.raises(SetupError, match="not run again: an earlier attempt of this data-prep task failed with a user "
                                         "error, which a retry repeats: .*missing.jsonl: data file not found"):
        run_stage("data-prep", config_json, {}, str(output))
    assert time.monotonic() - started < 2

    unreachable = json.dumps({**json.loads(config_json), "tracking": {"uri": "http://127.0.0.1:9", "retry_seconds": 0}})
    output = tmp_path / "task2" / "data"
    for _ in range(2):  # both attempts do the work and meet the same outage: nothing marks the task as hopeless
        with pytest.raises(TrackingError, match="did not answer"):
            run_stage("data-prep", unreachable, {}, str(output))
    assert not list(output.parent.glob("*.user-error"))


def test_an_export_user_error_fails_once_in_the_pipeline(tmp_path):
    """export-gguf with two retries and a verification limit no file can meet: the export runs once; both retries stop
    at once on the marker the first attempt left."""
    tolerance = {"max_kl": 1e-12, "min_argmax": 1.0, "min_top5": 1.0}
    config = make_config(tmp_path, [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(24))],
                         export={"types": ["q8_0"], "tolerances": {"q8_0": tolerance}},
                         cluster={"resources": {"default": {"retries": 0},
                                                "export-gguf": {"retries": 2, "retry_backoff_seconds": 1}}})
    result = tuneforge("run", config, "--pipeline-root", tmp_path / "kfp")
    assert result.returncode == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["stages"]["export-gguf"]["status"] == "failed"
    log = Path(summary["log"]).read_text()
    assert log.count("writing test-q8_0.gguf") == 1
    assert log.count("not run again: an earlier attempt of this export-gguf task failed with a user error") == 2


def test_console_table_times_a_stage_whose_task_kfp_numbered():
    """In the branch taken when DPO wins, KFP names the tasks export-gguf-2, register-2: the table still shows their time."""
    import io

    from tuneforge.pipelines.console import Console

    out = io.StringIO()
    console = Console(out)
    for task in ("merge", "merge-sft", "export-gguf-2"):
        console.feed(f"12:00:00.000 - INFO - Executing task \x1b[96m'{task}'\x1b[0m")
        console.started[task] -= {"merge": 7, "merge-sft": 30, "export-gguf-2": 15}[task]
        console.feed(f"12:00:15.000 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
    console.table({"stages": {"merge": {"status": "succeeded"}, "export-gguf": {"status": "succeeded"}}})
    rows = {line.split()[0]: line.split()[2] for line in out.getvalue().splitlines() if "succeeded" in line and "✓" not in line}
    assert rows == {"merge": "7", "export-gguf": "15"}
