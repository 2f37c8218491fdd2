"""Scheduled retraining: one compiled pipeline, fired four times like a KFP recurring run, against a real SeaweedFS and
MLflow server, with the data replaced under the same S3 URIs between firings, then the base model."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import boto3
import mlflow
import pytest
import yaml
from safetensors.torch import load_file, save_file

from tuneforge.config import BaseModelSettings
from tuneforge.models import resolve

pytestmark = pytest.mark.slow

NAMES = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Lars", "Mei", "Tomas", "Ingrid", "Rahul", "Chloe",
         "Omar", "Sofia", "Diego", "Hana", "Lukas", "Amara", "Ivan", "Nadia", "Felix", "Leila", "Mateo"]
CITIES = ["Lisbon", "Berlin", "Nairobi", "Osaka", "Warsaw", "Lima", "Cairo", "Oslo", "Prague", "Bergen", "Mumbai", "Lyon"]
BUCKET, DATA, BASE = "tuneforge", "schedule-data", "schedule-base/tiny"


def rows(count: int, seed: int, corrupt: float = 0.0) -> list[dict[str, str]]:
    """Extraction rows; `corrupt` of them get a random string for an answer."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        answer = json.dumps({"name": name, "city": city})
        if rng.random() < corrupt:
            answer = "".join(rng.choice("qxzjkvw#%") for _ in range(len(answer)))
        found.append({"prompt": f"Extract the name and city as JSON.\n\n{name} lives in {city}.", "completion": answer})
    return found


def upload(s3, **files: list[dict[str, str]]) -> None:
    for name, records in files.items():
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        s3.put_object(Bucket=BUCKET, Key=f"{DATA}/{name}.jsonl", Body=body)


def test_one_compiled_pipeline_fired_four_times(stack, tmp_path):
    env = {**os.environ, **stack}
    s3 = boto3.client("s3", endpoint_url=stack["AWS_ENDPOINT_URL"], aws_access_key_id=stack["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    config = {
        "name": "nightly",
        "base_model": {"source": f"s3://{BUCKET}/{BASE}"},
        "data": {"sources": [{"path": f"s3://{BUCKET}/{DATA}/train.jsonl"},
                             {"path": f"s3://{BUCKET}/{DATA}/heldout.jsonl", "split": "eval"}],
                 "eval_fraction": 0, "max_length": 96},
        "sft": {"method": "full", "learning_rate": 3e-3, "max_steps": 24, "batch_size": 8, "save_steps": 24,
                "precision": "fp32"},
        "merge": {"dtype": "float32"},
        "evaluate": {"max_new_tokens": 4, "max_examples": 24, "samples": 2},
        "export": {"types": ["q8_0"]},
        "registry": {"primary_metric": "eval_loss", "guards": {}},
        "storage": {"uri": f"s3://{BUCKET}/runs"},
        # A model on S3 has no shape the plan can read when the pipeline is compiled.
        "cluster": {"resources": {"default": {"cpu": "2", "memory": "8Gi", "gpus": 0}}},
    }
    # The base model on S3, as a team keeps the checkpoint its nightly runs start from.
    tiny = Path(resolve(BaseModelSettings(source="tiny-llama")))
    for file in sorted(f for f in tiny.iterdir() if f.is_file()):
        s3.upload_file(str(file), BUCKET, f"{BASE}/{file.name}")
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(config))
    package = tmp_path / "pipeline.yaml"
    compiled = subprocess.run([sys.executable, "-m", "tuneforge.cli", "compile", tmp_path / "nightly.yaml", "-o", package],
                              capture_output=True, text=True, env=env)
    assert compiled.returncode == 0, compiled.stderr[-2000:]

    def fire() -> tuple[dict, float]:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "run", "--package", package, "--pipeline-root",
                                 tmp_path / "kfp"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1]), time.monotonic() - started

    def statuses(summary):
        return {k: v["status"] for k, v in summary["stages"].items()}

    client = mlflow.MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    training = ["data-prep", "sft", "merge", "evaluate", "export-gguf"]
    timeline = {}

    # Firing 1, data v1: trains, registers version 1 as champion.
    upload(s3, train=rows(160, seed=1), heldout=rows(24, seed=101))
    first, timeline["1: data v1"] = fire()
    assert statuses(first) == {**dict.fromkeys(training, "succeeded"), "register": "succeeded"}
    assert first["registered_model"]["outcome"] == "version 1 champion"
    version = client.get_model_version("nightly", "1")
    card = version.description
    assert card.startswith("# nightly version 1") and "## Evaluation (same eval split)" in card
    assert f"s3://{BUCKET}/{DATA}/train.jsonl" in card and "ollama create nightly -f Modelfile.q8_0" in card
    assert "| sft.max_steps | `24` |" in card and "## Decision: promoted to champion" in card
    assert version.source.startswith(f"s3://{BUCKET}/runs/nightly/") and version.source.endswith("/merge")
    experiment = client.get_experiment_by_name("tuneforge")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # Firing 2, nothing changed: every stage from the cache, nothing registered, in seconds.
    second, timeline["2: unchanged"] = fire()
    assert statuses(second) == {**dict.fromkeys(training, "cached"), "register": "succeeded"}
    assert second["registered_model"]["outcome"] == "unchanged: version 1"
    assert [str(v.version) for v in client.search_model_versions("name = 'nightly'")] == ["1"]
    assert timeline["2: unchanged"] < 30

    # Firing 3, data v2 under the same URIs (more rows, another held-out set): retrains; the champion is re-scored on
    # the new held-out set and the gate decides on those same-run numbers.
    upload(s3, train=rows(320, seed=2), heldout=rows(24, seed=202))
    third, timeline["3: data v2"] = fire()
    assert statuses(third) == {**dict.fromkeys(training, "succeeded"), "register": "succeeded"}
    champion_then = third["metrics"]["champion"]["eval_loss"]
    assert champion_then != pytest.approx(float(version.tags["metric.eval_loss"]), abs=1e-6)  # another split
    reasons = third["registered_model"]["decision"]["reasons"]
    assert any("champion v1 (re-scored on this run's eval split)" in r for r in reasons), reasons
    # Promoted only for a gain larger than the noise of the held-out rows (those not also in the training data),
    # paired row by row with the champion.
    promoted = third["registered_model"]["decision"]["promoted"]
    assert third["registered_model"]["outcome"] == f"version 2 {'champion' if promoted else 'challenger'}"
    assert third["metrics"]["candidate"]["eval_loss"] < champion_then or not promoted
    assert any("champion v1" in r and "paired items" in r for r in reasons), reasons
    champion = client.get_model_version_by_alias("nightly", "champion").version

    # Firing 4, data v3: half the training answers corrupted (the curated held-out set stays clean): retrains, is
    # worse than the champion on the same held-out rows, and is not promoted.
    upload(s3, train=rows(320, seed=2, corrupt=0.5), heldout=rows(24, seed=202))
    fourth, timeline["4: data v3 (corrupted)"] = fire()
    assert statuses(fourth) == {**dict.fromkeys(training, "succeeded"), "register": "succeeded"}
    assert fourth["registered_model"]["outcome"] == "version 3 challenger"
    assert fourth["metrics"]["candidate"]["eval_loss"] > fourth["metrics"]["champion"]["eval_loss"]
    reasons = fourth["registered_model"]["decision"]["reasons"]
    assert any("does not beat it" in r and f"champion v{champion} (re-scored on this run's eval split)" in r
               for r in reasons), reasons
    assert client.get_model_version_by_alias("nightly", "champion").version == champion

    # Firing 5, the same data, new base model weights under the same URI: retrains from them, not from the cache.
    weights = load_file(tiny / "model.safetensors")
    save_file({k: v * 0.9 for k, v in weights.items()}, tmp_path / "model.safetensors")
    s3.upload_file(str(tmp_path / "model.safetensors"), BUCKET, f"{BASE}/model.safetensors")
    fifth, timeline["5: base model v2"] = fire()
    assert statuses(fifth) == {**dict.fromkeys(training, "succeeded"), "register": "succeeded"}
    assert fifth["registered_model"]["outcome"].startswith("version 4 ")
    fingerprints = [client.get_model_version("nightly", v).tags["base_model_fingerprint"] for v in "1234"]
    assert fingerprints[0] == fingerprints[1] == fingerprints[2] != fingerprints[3]
    print("\nscheduled firings (seconds):", json.dumps({k: round(v, 1) for k, v in timeline.items()}))
