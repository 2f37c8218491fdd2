"""task: classification: a sequence classifier trained by the sft stage, merged, evaluated and registered; no GGUF."""

import json
import random
import subprocess
import sys

import mlflow
import pytest
import yaml
from conftest import EXAMPLES, cli, make_config, write_jsonl
from safetensors.torch import load_file

from tuneforge import classification
from tuneforge.config import load_config

FILLER = ["the", "order", "was", "from", "my", "shop", "today", "and", "it", "came", "with", "a", "note", "again"]


def keyword_rows(n: int, seed: int = 0, key: str = "text", labels=("happy", "sad", "angry")):
    """Rows whose label is given by one keyword among random filler words: a task the random tiny model can learn."""
    rng = random.Random(seed)
    words = {"happy": "wonderful", "sad": "gloomy", "angry": "furious"}
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        filler = rng.sample(FILLER, 6)
        filler.insert(rng.randrange(len(filler)), words.get(label, label))
        rows.append({key: " ".join(filler) + f" {i}", "label": label})
    return rows


def classifier_config(tmp_path, sources, **sections):
    return make_config(tmp_path, sources, task="classification",
                       sft={"epochs": 6, "max_steps": -1, "batch_size": 8, "learning_rate": 1e-3, "save_steps": 50},
                       registry={"primary_metric": "accuracy", "guards": {}}, evaluate={"max_examples": 100}, **sections)


def tuneforge(*args):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True)


def test_metrics_accuracy_macro_f1_and_confusion():
    found = classification.metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert found["accuracy"] == pytest.approx(4 / 6)
    assert found["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    # F1 per label: 0: p 1/2 r 1/2; 1: p 1 r 1/2; 2: p 2/3 r 1.
    assert found["f1_per_label"] == pytest.approx([0.5, 2 / 3, 0.8])
    assert found["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    # A label neither true nor predicted does not count towards the mean (as scikit-learn's macro average).
    assert classification.metrics([0, 1], [0, 1], 3)["macro_f1"] == 1.0
    # And as scikit-learn computes them, on random labels.
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(3)
    truth, predicted = [rng.randrange(4) for _ in range(200)], [rng.randrange(4) for _ in range(200)]
    found = classification.metrics(predicted, truth, 4)
    assert found["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert found["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_a_classifier_that_answers_one_label_goes_no_further_whatever_its_accuracy():
    """On 90/10 held-out rows a model that always answers the majority label scores accuracy 0.9, above an untrained
    head; evaluate's gate stops it by what it answered, not by its score."""
    from tuneforge.components.evaluate import only_label

    truth = [0] * 36 + [1] * 4
    constant = classification.metrics([0] * 40, truth, 2)
    assert constant["accuracy"] == 0.9 and only_label(constant["confusion"], ["neg", "pos"]) == "neg"
    assert only_label(classification.metrics([0] * 39 + [1], truth, 2)["confusion"], ["neg", "pos"]) is None


def test_label_names_and_indices():
    assert classification.label_names([2, "10", 1], None) == ["1", "2", "10"]  # integers sort as numbers
    assert classification.label_names(["b", "a", "b"], None) == ["a", "b"]
    assert classification.label_index(1, ["negative", "positive"], configured=True) == 1  # an index into the names
    assert classification.label_index("positive", ["negative", "positive"], configured=True) == 1
    with pytest.raises(ValueError, match="label 'neutral' is not one of classification.labels"):
        classification.label_index("neutral", ["negative", "positive"], configured=True)


def test_data_prep_reads_public_shapes_of_labelled_rows(tmp_path):
    # SST-2's shape: sentence and an integer label, named by classification.labels.
    rows = [{"idx": i, "sentence": r["text"], "label": i % 2} for i, r in enumerate(keyword_rows(40))]
    config = make_config(tmp_path, [write_jsonl(tmp_path / "sst2.jsonl", rows)], task="classification",
                         classification={"labels": ["negative", "positive"]}, data={"eval_fraction": 0.25})
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["lineage"]["labels"] == ["negative", "positive"]
    report = json.loads((tmp_path / "data" / "data_report.json").read_text())
    assert (report["classification_train"], report["classification_eval"]) == (30, 10)
    assert sum(report["labels"]["train"].values()) == 30 and set(report["labels"]["train"]) == {"negative", "positive"}
    assert report["sources"][0]["format"] == "classification" and report["sources"][0]["ignored_columns"] == ["idx"]
    assert "| negative |" in (tmp_path / "data" / "report.md").read_text()
    assert report["conflicting_labels"] == 0


def test_data_prep_counts_texts_given_two_labels(tmp_path):
    rows = keyword_rows(20) + [{"text": "The parcel is LATE", "label": "sad"}, {"text": "the parcel is late", "label": "angry"}]
    config = make_config(tmp_path, [write_jsonl(tmp_path / "rows.jsonl", rows)], task="classification")
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "data" / "data_report.json").read_text())["conflicting_labels"] == 1


@pytest.mark.parametrize("rows, settings, message", [
    ([{"text": "a b c", "label": 5}, {"text": "b c d", "label": 0}], {"labels": ["no", "yes"]},
     r"rows.jsonl:1: label 5 is not one of classification.labels \(no, yes\)"),
    ([{"text": "a b c", "label": "x"}, {"text": "b c d", "label": "x"}], {},
     "every classification training row has the label 'x': a classifier needs at least two labels"),
    ([{"text": "a b c", "label": None}], {}, r"rows.jsonl:1: field 'label' must be a class name or an integer"),
    ([{"text": "a b c"}], {}, r"rows.jsonl:1: field 'label' must be a class name or an integer, got None"),
])
def test_data_prep_refuses_rows_a_classifier_cannot_learn_from(tmp_path, rows, settings, message):
    config = make_config(tmp_path, [write_jsonl(tmp_path / "rows.jsonl", rows)], task="classification",
                         classification=settings, data={"eval_fraction": 0.0})
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data")
    assert result.exit_code == 2
    assert __import__("re").search(message, result.stderr), result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, key", [
    ("dpo.enabled=true", "dpo.enabled: task classification trains a classifier in the sft stage"),
    ("grpo.enabled=true", "grpo.enabled: task classification"),
    ("sft.method=qlora", "sft.method qlora: task classification trains full or lora"),
    ("registry.primary_metric=task_score", "registry.primary_metric 'task_score': task classification is scored by"),
    ("sft.packing=true", "sft.packing"),
])
def test_configs_a_classifier_cannot_run_exit_2_naming_the_key(tmp_path, override, key):
    result = cli("validate", EXAMPLES / "classify.yaml", "--set", override)
    assert result.exit_code == 2 and key in result.stderr, result.stderr


def test_the_example_defaults_to_accuracy_and_skips_gguf():
    config = load_config(EXAMPLES / "classify.yaml")
    assert config.registry.primary_metric == "accuracy" and not config.exports_gguf
    # A stage's view (what its task and cache key get) keeps the task and the default it implies.
    assert config.view("register").registry.primary_metric == "accuracy"
    assert config.view("sft").task == "classification"


def test_compiled_classifier_pipeline_has_no_export(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = cli("compile", EXAMPLES / "classify.yaml", "-o", out)
    assert result.exit_code == 0, result.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = {name for component in spec["components"].values() for name in component.get("dag", {}).get("tasks", {})}
    assert {"data-prep", "sft", "merge", "evaluate", "register"} <= tasks
    assert not tasks & {"dpo", "grpo", "export-gguf", "serve-check", "merge-2"}


def test_lora_classifier_keeps_its_best_epoch_and_stops_early(tmp_path):
    sources = [write_jsonl(tmp_path / "rows.jsonl", keyword_rows(96))]
    config = classifier_config(tmp_path, sources, data={"eval_fraction": 0.25})
    data = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data")
    assert data.exit_code == 0, data.stderr
    common = ["--config", config, "--set", "sft.method=lora", "--set", "sft.epochs=12", "--set", "sft.learning_rate=1e-2",
              "--set", "sft.early_stopping_patience=1", "--set", "sft.lora.target_modules=all-linear"]
    trained = cli("stage", "sft", *common, "--input", f"data={tmp_path / 'data'}", "--output", tmp_path / "sft")
    assert trained.exit_code == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    metrics, lineage = manifest["metrics"], manifest["lineage"]
    assert lineage["labels"] == ["angry", "happy", "sad"] and lineage["task"] == "classification"
    assert lineage["validation_rows"] == 8 and lineage["kind"] == "adapter"
    # An evaluation per epoch, each with accuracy and macro-F1; stopped once the best stopped improving.
    history = json.loads((tmp_path / "sft" / "train_history.json").read_text())
    epochs = [e for e in history if "eval_accuracy" in e and "eval_macro_f1" in e]
    steps_per_epoch = 9  # 64 training rows less 8 for validation, batches of 8 (rounded up)
    assert len(epochs) >= 2 and metrics["steps"] < 12 * steps_per_epoch, epochs
    best = max(e["eval_accuracy"] for e in epochs[:-1])
    kept = next(e for e in epochs if e["step"] == metrics["kept_step"])
    assert kept["eval_accuracy"] == best == metrics["kept_metric"]
    assert metrics["eval_accuracy"] == best  # the final metrics are the kept checkpoint's
    # The adapter holds the LoRA weights, trained, and the whole classification head.
    adapter = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    assert any("score" in k for k in adapter) and all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)

    merged = cli("stage", "merge", "--config", config, "--input", f"model={tmp_path / 'sft'}", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr[-3000:]
    merge_metrics = json.loads((tmp_path / "merged" / "manifest.json").read_text())["metrics"]
    assert merge_metrics["merge_max_abs_logit_diff"] < 1e-3
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert saved["id2label"] == {"0": "angry", "1": "happy", "2": "sad"}


def test_classifier_pipeline_trains_evaluates_and_registers_without_gguf(tmp_path):
    sources = [write_jsonl(tmp_path / "rows.jsonl", keyword_rows(120)),
               {"path": str(write_jsonl(tmp_path / "heldout.jsonl", keyword_rows(30, seed=1))), "split": "eval"}]
    config = classifier_config(tmp_path, sources, data={"eval_fraction": 0.0})
    result = tuneforge("run", config, "--pipeline-root", tmp_path / "kfp")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {k: v["status"] for k, v in summary["stages"].items()} == dict.fromkeys(
        ["data-prep", "sft", "merge", "evaluate", "register"], "succeeded")
    assert "GGUF converter has no sequence-classification head" in summary["skipped"]["export-gguf"]
    candidate, base = summary["metrics"]["candidate"], summary["metrics"]["base"]
    assert candidate["accuracy"] >= 0.9 and candidate["accuracy"] > base["accuracy"] + 0.3, summary["metrics"]
    assert candidate["macro_f1"] >= 0.9
    assert summary["registered_model"]["aliases"] == ["challenger", "champion"]
    checklist = {i["key"]: i["status"] for i in summary["checklist"]}
    assert checklist["merged_model_tested_at_inference"] == "pass" and checklist["eval_loss_watched"] == "pass"
    assert checklist["completion_only_loss_mask"] == "n/a"

    evaluation = json.loads((tmp_path / "kfp").glob("*/evaluate/evaluation/metrics.json").__next__().read_text())
    assert evaluation["heldout_rows"] == 30 and evaluation["majority_accuracy"] == pytest.approx(1 / 3)
    assert sum(map(sum, evaluation["confusion"]["candidate"])) == 30
    assert (tmp_path / "kfp").glob("*/evaluate/evaluation/confusion_matrix.png").__next__().stat().st_size > 5000

    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    sft_run = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id],
                                 "tags.`tuneforge.stage` = 'sft'")[0]
    per_epoch = client.get_metric_history(sft_run.info.run_id, "sft/eval_accuracy")
    assert len(per_epoch) >= 2
    version = client.get_model_version_by_alias("test", "champion")
    assert version.tags["trained_by"] == "sft" and "gguf_files" not in version.tags
