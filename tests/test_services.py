"""S3 and MLflow against real servers: SeaweedFS and an MLflow tracking server, started on free local ports."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import mlflow
import pytest
from conftest import EXAMPLES

from tuneforge import registry, services, storage
from tuneforge.config import RegistrySettings
from tuneforge.errors import IncompleteOutputError, RegistryError, StorageError


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("services")
    env = services.up(folder)
    yield folder, env
    services.down(folder)


@pytest.fixture
def s3_env(stack, monkeypatch):
    for key, value in stack[1].items():
        monkeypatch.setenv(key, value)
    return stack[1]


def _client(env):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def _stage_output(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    (folder / "sub").mkdir()
    (folder / "sub" / "note.txt").write_text("hello")
    storage.write_manifest(folder, "merge", {"base_model": "x"}, {})
    return folder


def test_publish_and_fetch_round_trip(s3_env, tmp_path):
    folder = _stage_output(tmp_path)
    uri = storage.publish(folder, "s3://tuneforge/tests/round-trip")
    fetched = storage.fetch(uri, tmp_path / "back")
    assert (fetched / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
    assert (fetched / "sub" / "note.txt").read_text() == "hello"
    keys = {o["Key"] for o in _client(s3_env).list_objects_v2(Bucket="tuneforge", Prefix="tests/round-trip")["Contents"]}
    assert keys == {"tests/round-trip/weights.bin", "tests/round-trip/sub/note.txt", "tests/round-trip/manifest.json"}


def test_corrupted_object_is_detected(s3_env, tmp_path):
    uri = storage.publish(_stage_output(tmp_path), "s3://tuneforge/tests/corrupt")
    _client(s3_env).put_object(Bucket="tuneforge", Key="tests/corrupt/sub/note.txt", Body=b"tampered")
    with pytest.raises(StorageError, match="sub/note.txt: checksum mismatch"):
        storage.fetch(uri, tmp_path / "back")
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.partial").exists()


def test_half_uploaded_output_is_never_complete(s3_env, tmp_path):
    _client(s3_env).put_object(Bucket="tuneforge", Key="tests/half/weights.bin", Body=b"partial")
    with pytest.raises(IncompleteOutputError, match="no manifest.json"):
        storage.fetch("s3://tuneforge/tests/half", tmp_path / "back")


def test_wrong_credentials_give_a_clear_error_without_the_secret(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as err:
        storage.publish(_stage_output(tmp_path), "s3://tuneforge/tests/denied")
    assert "S3 refused access to s3://tuneforge/tests/denied" in str(err.value) and "SignatureDoesNotMatch" in str(err.value)
    assert "not-the-secret" not in str(err.value) and s3_env["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_services_status_and_idempotent_up(stack):
    folder, env = stack
    assert services.up(folder) == env  # already running: same endpoints, nothing restarted
    state = services.status(folder)
    assert state["running"] and state["mlflow_tracking_uri"] == env["MLFLOW_TRACKING_URI"]
    assert oct((folder / "env").stat().st_mode)[-3:] == "600"


def test_registry_gate_both_ways_and_rollback(s3_env):
    client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    settings = RegistrySettings(primary_metric="task_score", guards={"eval_loss": 0.1})
    base = {"task_score": 0.1, "eval_loss": 1.0}
    name = "gate-test"

    def register(source, candidate):
        return registry.register(client, name, source, None, {}, {"base": base, "candidate": candidate}, source, settings)

    first = register("s3://tuneforge/m/1", {"task_score": 0.5, "eval_loss": 0.5})
    assert first["decision"]["promoted"] and first["aliases"] == ["challenger", "champion"]

    worse = register("s3://tuneforge/m/2", {"task_score": 0.4, "eval_loss": 0.4})
    assert not worse["decision"]["promoted"] and worse["aliases"] == ["challenger"]
    assert any("does not beat" in r and "champion" in r for r in worse["decision"]["reasons"])

    guarded = register("s3://tuneforge/m/3", {"task_score": 0.9, "eval_loss": 0.75})
    assert not guarded["decision"]["promoted"]
    assert any(r.startswith("guard eval_loss regresses by 0.25 against champion") for r in guarded["decision"]["reasons"])

    better = register("s3://tuneforge/m/4", {"task_score": 0.9, "eval_loss": 0.45})
    assert better["decision"]["promoted"]
    assert client.get_model_version_by_alias(name, "champion").version == "4"

    # The champion re-scored in the same run decides; when its files could not be read, its stored metrics do, and the
    # reasons say so.
    rescored = registry.register(client, name, "s3://tuneforge/m/5", None, {}, {
        "base": base, "candidate": {"task_score": 0.95, "eval_loss": 0.4},
        "champion": {"task_score": 0.97, "eval_loss": 0.4}, "champion_model_sha256": "s3://tuneforge/m/4"},
        "s3://tuneforge/m/5", settings)
    assert not rescored["decision"]["promoted"]
    assert any("vs champion v4 (re-scored on this run's eval split) 0.97: does not beat" in r
               for r in rescored["decision"]["reasons"]), rescored["decision"]
    unread = registry.register(client, name, "s3://tuneforge/m/6", None, {}, {
        "base": base, "candidate": {"task_score": 0.95, "eval_loss": 0.4},
        "champion_error": "its files at s3://tuneforge/m/4 cannot be read: no manifest.json"}, "s3://tuneforge/m/6", settings)
    assert unread["decision"]["promoted"]
    assert any("champion v4 (its stored metrics, from its own eval split: its files at s3://tuneforge/m/4 cannot be read"
               in r for r in unread["decision"]["reasons"]), unread["decision"]
    client.set_registered_model_alias(name, "champion", "4")  # back to the state the rollback below expects

    assert registry.rollback(client, name) == {"name": name, "from": "4", "to": "1"}
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    listed = {v["version"]: v for v in registry.versions(client, name)}
    assert listed["1"]["aliases"] == ["champion"] and listed["4"]["metrics"]["task_score"] == 0.9
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(client, name)


def test_a_win_within_the_noise_of_the_eval_split_is_not_promoted(s3_env):
    """40 eval tasks, the champion right on 30. A candidate right on 2 more is 0.05 better on the means, inside the
    noise of 40 paired tasks (95%: ±0.068): it stays challenger, and the reasons say what to change. 8 more right is a
    clear win. confidence 0 decides on the means alone."""
    client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    name = "noise-test"
    base_items = {"task_score": [0.0] * 40}
    champion_items = {"task_score": [1.0] * 30 + [0.0] * 10}

    def register(source, right, confidence=0.95):
        items = {"task_score": [1.0] * right + [0.0] * (40 - right)}
        evaluation = {"base": {"task_score": 0.0}, "candidate": {"task_score": right / 40},
                      "noise": {"base": registry.paired_noise(items, base_items),
                                "champion": registry.paired_noise(items, champion_items)}}
        if client.search_model_versions(f"name = '{name}'"):
            evaluation |= {"champion": {"task_score": 0.75}, "champion_model_sha256": "s3://tuneforge/n/1"}
        settings = RegistrySettings(primary_metric="task_score", guards={}, confidence=confidence)
        return registry.register(client, name, source, None, {}, evaluation, source, settings)

    assert register("s3://tuneforge/n/1", 30)["decision"]["promoted"]
    noisy = register("s3://tuneforge/n/2", 32)
    assert not noisy["decision"]["promoted"] and noisy["aliases"] == ["challenger"]
    assert any("task_score 0.8 vs champion v1 (re-scored on this run's eval split) 0.75: the gain 0.05 is within the "
               "noise of 40 paired items (±0.0684 at 95% confidence): not a clear win. More eval rows or tasks narrow "
               "it; registry.confidence: 0 decides on the means alone" in r for r in noisy["decision"]["reasons"]), noisy
    assert any("vs base 0: beats it by more than 0.0 plus the noise of 40 paired items" in r
               for r in noisy["decision"]["reasons"]), noisy
    assert register("s3://tuneforge/n/3", 32, confidence=0)["decision"]["promoted"]
    client.set_registered_model_alias(name, "champion", "1")
    clear = register("s3://tuneforge/n/4", 38)
    assert clear["decision"]["promoted"], clear
    assert any("0.95 vs champion v1 (re-scored on this run's eval split) 0.75: beats it by more than 0.0 plus the noise "
               "of 40 paired items (±0.126 at 95%)" in r for r in clear["decision"]["reasons"]), clear


def test_manual_approval_waits_for_a_person_both_ways(stack, s3_env, monkeypatch):
    """registry.approval: manual: a candidate that passes the gate waits as approved-pending and only `tuneforge
    promote` (the approval) makes it champion, recording who and when; one that fails the gate does not wait."""
    from conftest import cli

    client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    settings = RegistrySettings(primary_metric="task_score", guards={}, approval="manual")
    name = "approval-test"
    base = {"task_score": 0.1}

    def register(score):
        return registry.register(client, name, f"s3://tuneforge/a/{score}", None, {},
                                 {"base": base, "candidate": {"task_score": score}}, f"digest-{score}", settings)

    first = register(0.5)
    assert first["decision"]["approval_pending"] and not first["decision"]["promoted"]
    assert first["aliases"] == ["approved-pending", "challenger"] and registry.current_champion(client, name) is None
    assert any("tuneforge promote approval-test 1" in r for r in first["decision"]["reasons"])

    # The approval is the approver's (services up made the identity); it records who the server authenticated.
    folder = stack[0]
    for key, value in services.Stack(folder).state()["identities"]["approver"].items():
        monkeypatch.setenv(key, value)
    approved = cli("promote", name, "1", "--tracking-uri", s3_env["MLFLOW_TRACKING_URI"])
    assert approved.exit_code == 0, approved.stderr
    assert json.loads(approved.stdout)["approved_by"] == "approver"
    version = client.get_model_version(name, "1")
    assert sorted(version.aliases) == ["challenger", "champion"]  # approved-pending is gone
    assert version.tags["approved_by"] == "approver" and version.tags["approved_at"].endswith("Z")
    for key, value in s3_env.items():  # the pipeline's identity again
        monkeypatch.setenv(key, value)

    rejected = register(0.3)  # worse than the champion: nothing to approve
    assert not rejected["decision"]["approval_pending"] and rejected["aliases"] == ["challenger"]
    assert registry.current_champion(client, name).version == "1"


def test_runs_registering_at_once_end_with_the_best_as_the_one_champion(s3_env):
    """Eight runs register at the same moment against the real server: the gate decides one after the other, so the
    champion is the best candidate, every run's decision agrees with the final state, and the lock is gone."""
    settings = RegistrySettings(primary_metric="task_score", guards={})
    name = "race-test"
    scores = [0.31, 0.77, 0.12, 0.65, 0.9, 0.45, 0.58, 0.2]
    barrier = threading.Barrier(len(scores))

    def register(score):
        client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
        barrier.wait()
        return registry.register(client, name, f"s3://tuneforge/r/{score}", None, {},
                                 {"base": {"task_score": 0.0}, "candidate": {"task_score": score}}, str(score), settings)

    with ThreadPoolExecutor(len(scores)) as pool:
        results = list(pool.map(register, scores))
    client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["metric.task_score"] == "0.9"
    versions = registry.versions(client, name)
    assert len(versions) == len(scores) and sum("champion" in v["aliases"] for v in versions) == 1
    # Each promotion replaced a worse champion: following previous_champion from the champion visits rising scores.
    promoted = [r for r in results if r["decision"]["promoted"]]
    chain = [float(client.get_model_version(name, r["version"]).tags["metric.task_score"]) for r in promoted]
    assert sorted(chain) == sorted(set(chain)) and max(chain) == 0.9
    for result in results:
        if not result["decision"]["promoted"]:
            assert any("does not beat" in reason for reason in result["decision"]["reasons"]), result
    assert client.search_registered_models(f"name = '{name}.{registry.LOCK_SUFFIX}'") == []


def test_a_lock_left_by_a_killed_run_is_broken(s3_env):
    client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    name = "stale-lock-test"
    created = time.monotonic()
    client.create_registered_model(f"{name}.{registry.LOCK_SUFFIX}")
    with pytest.raises(RegistryError, match=f"delete the registered model {name}.{registry.LOCK_SUFFIX}"):
        with registry.promotion_lock(client, name, wait=1):
            pass
    with registry.promotion_lock(client, name, wait=30, stale_after=3):
        # Broken once it was stale (the server's clock and timestamps in milliseconds allow a little slack), not before.
        assert time.monotonic() - created >= 2.5
    assert client.search_registered_models(f"name = '{name}.{registry.LOCK_SUFFIX}'") == []


def test_the_lock_is_taken_when_its_holder_releases_it_during_the_refused_create(s3_env):
    """MLflow words a refused create by reading the existing model back; when the holder deletes the lock between the
    two, the server answers RESOURCE_DOES_NOT_EXIST (seen in the eight-run race above). That answer means the lock is
    free: the run takes it and registers, rather than failing. The interleaving is forced here; the rest is the server."""
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    name = "released-lock-test"
    lock = f"{name}.{registry.LOCK_SUFFIX}"

    class HolderReleasesMidCreate(mlflow.MlflowClient):
        refused = 0

        def create_registered_model(self, model_name, *args, **kwargs):
            if model_name == lock and not self.refused:
                self.refused += 1
                with pytest.raises(mlflow.exceptions.MlflowException, match="RESOURCE_ALREADY_EXISTS|already exists"):
                    super().create_registered_model(model_name, *args, **kwargs)
                super().delete_registered_model(lock)  # the holder's release, after the server refused the create
                raise mlflow.exceptions.MlflowException(f"Registered Model with name={lock} not found",
                                                        error_code=RESOURCE_DOES_NOT_EXIST)
            return super().create_registered_model(model_name, *args, **kwargs)

    mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"]).create_registered_model(lock)  # another run's
    client = HolderReleasesMidCreate(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    with registry.promotion_lock(client, name, wait=30):
        assert client.refused == 1 and client.get_registered_model(lock).name == lock
    assert client.search_registered_models(f"name = '{lock}'") == []


def test_four_pipelines_at_once_share_one_seaweedfs_and_mlflow(s3_env, stack, tmp_path):
    """Four runs of one model, each with a different amount of training, started together: all finish, each keeps
    its own artifacts, and the registry ends with one champion, the best of them."""
    name = "tiny-concurrent"
    steps = [4, 8, 16, 30]
    started = time.monotonic()
    processes = [
        subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "run", str(EXAMPLES / "tiny.yaml"),
                          "--pipeline-root", str(tmp_path / f"kfp{n}"), "--set", f"workdir={tmp_path / f'work{n}'}",
                          "--set", f"name={name}", "--set", "storage.uri=s3://tuneforge/runs", "--set", f"sft.max_steps={n}",
                          "--set", "dpo.enabled=false", "--set", "export.enabled=false"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in steps
    ]
    outputs = [p.communicate(timeout=1500) for p in processes]
    elapsed = time.monotonic() - started
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert all(s["status"] == "succeeded" for s in summaries)
    run_ids = {s["mlflow"]["run_id"] for s in summaries}
    assert len(run_ids) == len(steps)

    # Each run's artifacts are its own and intact (fetch checks every checksum).
    hashes = set()
    for summary, n in zip(summaries, steps, strict=True):
        merged = storage.fetch(f"s3://tuneforge/runs/{name}/{summary['mlflow']['run_id']}/merge", tmp_path / f"merged{n}")
        manifest = json.loads((merged / "manifest.json").read_text())
        assert manifest["lineage"]["mlflow_run_id"] in {r.info.run_id for r in _children(summary)}
        hashes.add(manifest["lineage"]["config_hash"])
    assert len(hashes) == len(steps)

    client = mlflow.MlflowClient(tracking_uri=s3_env["MLFLOW_TRACKING_URI"])
    for summary in summaries:
        assert client.get_run(summary["mlflow"]["run_id"]).info.status == "FINISHED"
        assert {r.info.status for r in _children(summary)} == {"FINISHED"}
    versions = registry.versions(client, name)
    assert len(versions) == len(steps) and sum("champion" in v["aliases"] for v in versions) == 1
    best = min(versions, key=lambda v: v["metrics"]["eval_loss"])
    assert "champion" in best["aliases"]
    for summary in summaries:
        registered = summary["registered_model"]
        assert registered["decision"]["promoted"] or any("does not beat" in r for r in registered["decision"]["reasons"])
    assert client.search_registered_models(f"name = '{name}.{registry.LOCK_SUFFIX}'") == []
    locked = (stack[0] / "mlflow.log").read_text().count("database is locked")
    print(f"4 pipelines at once: {elapsed:.0f} s; 'database is locked' in the MLflow server log: {locked}")


def _children(summary):
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def assert_secrets_nowhere(values, s3_env, result, tmp_path, client, run_id, env):
    """The credentials of a real run appear in no log, MLflow param, tag or artifact, task output, object or
    compiled pipeline."""
    needles = [v.encode() for v in values]

    def clean(blob: bytes, where: str):
        for needle in needles:
            assert needle not in blob, f"a secret leaked into {where}"

    clean((result.stdout + result.stderr).encode(), "the command's output")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            clean(path.read_bytes(), str(path))
    experiment = client.get_run(run_id).info.experiment_id
    for run in client.search_runs([experiment]):
        clean(json.dumps([run.data.params, run.data.tags]).encode(), f"MLflow run {run.info.run_id}")
    for version in client.search_model_versions("name='tiny-extract'"):
        clean(json.dumps(dict(version.tags)).encode(), f"model version {version.version}")
    s3 = _client(s3_env)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="tuneforge"):
        for item in page.get("Contents", []):
            clean(s3.get_object(Bucket="tuneforge", Key=item["Key"])["Body"].read(), f"s3://tuneforge/{item['Key']}")
    compiled = tmp_path / "compiled.yaml"
    subprocess.run([sys.executable, "-m", "tuneforge.cli", "compile", str(EXAMPLES / "tiny.yaml"), "-o", str(compiled),
                    "--set", "storage.uri=s3://tuneforge/runs"], check=True, capture_output=True, env=env)
    clean(compiled.read_bytes(), "the compiled pipeline")


def test_datasets_and_base_models_from_s3(s3_env, tmp_path, monkeypatch):
    from conftest import alpaca_rows, cli, make_config, write_jsonl
    from safetensors.torch import load_file, save_file

    from tuneforge.config import BaseModelSettings
    from tuneforge.errors import ModelError
    from tuneforge.models import identity, resolve

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    client = _client(s3_env)
    client.upload_file(str(write_jsonl(tmp_path / "train.jsonl", alpaca_rows(12))), "tuneforge", "datasets/train.jsonl")
    local_model = resolve(BaseModelSettings(source="tiny-llama"))
    for file in sorted(p for p in Path(local_model).iterdir() if p.is_file()):
        client.upload_file(str(file), "tuneforge", f"models/tiny/{file.name}")
    config = make_config(tmp_path, [{"path": "s3://tuneforge/datasets/train.jsonl"}], base_model={"source": "s3://tuneforge/models/tiny"})
    result = cli("stage", "data-prep", "--config", config, "--output", tmp_path / "data")
    assert result.exit_code == 0, result.stderr or result.exception
    assert json.loads((tmp_path / "data" / "data_report.json").read_text())["rows_by_format"] == {"alpaca": 12}
    result = cli("stage", "sft", "--config", config, "--input", f"data={tmp_path / 'data'}", "--output", tmp_path / "sft")
    assert result.exit_code == 0, result.stderr or result.exception

    # New weights under the same URI: the fingerprint a scheduled run compares changes, and they are downloaded again
    # rather than the copy of the old ones used.
    settings = BaseModelSettings(source="s3://tuneforge/models/tiny")
    before, old_copy = identity(settings), resolve(settings)
    assert identity(settings) == before and resolve(settings) == old_copy
    weights = load_file(f"{local_model}/model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, tmp_path / "model.safetensors")
    client.upload_file(str(tmp_path / "model.safetensors"), "tuneforge", "models/tiny/model.safetensors")
    assert identity(settings) != before
    new_copy = resolve(settings)
    assert new_copy != old_copy
    assert (Path(new_copy) / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ModelError, match="s3://tuneforge/models/nope: no such object or prefix in S3"):
        resolve(BaseModelSettings(source="s3://tuneforge/models/nope"))

    missing = make_config(tmp_path, [{"path": "s3://tuneforge/datasets/nope.jsonl"}])
    result = cli("stage", "data-prep", "--config", missing, "--output", tmp_path / "data2")
    assert result.exit_code == 2 and "s3://tuneforge/datasets/nope.jsonl: no such object or prefix in S3" in result.stderr


def test_up_takes_new_ports_when_one_is_taken_before_seaweedfs_binds_it(tmp_path, monkeypatch):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = []

    def ports_with_one_taken():
        ports = real_ports()
        if not picks:
            ports["master"] = taken.getsockname()[1]
        picks.append(ports)
        return ports

    real_ports = services.seaweedfs_ports
    monkeypatch.setattr(services, "seaweedfs_ports", ports_with_one_taken)
    try:
        env = services.up(tmp_path)
        assert len(picks) == 2 and env["AWS_ENDPOINT_URL"].endswith(f":{picks[1]['s3']}")
        assert "tuneforge" in [b["Name"] for b in _client(env).list_buckets()["Buckets"]]
    finally:
        services.down(tmp_path)
        taken.close()
