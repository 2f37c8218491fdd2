"""Storage faults against a real SeaweedFS that the tests kill and start again on the same ports mid-transfer,
path traversal in S3 keys and manifests, and a killed stage resumed on another machine from checkpoints on S3."""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from tuneforge import services, storage
from tuneforge.errors import StorageError

BUCKET = "faults"


class Weed:
    """One SeaweedFS server with fixed ports and credentials, so a restart is the same server again."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key, self.secret = "tf" + secrets.token_hex(6), secrets.token_urlsafe(18)
        services.write_s3_identity(folder / "s3.json", self.key, self.secret)
        self.ports = services.seaweedfs_ports()
        self.process, self.url = None, None

    def start(self):
        self.process, self.url = services.start_seaweedfs(self.folder, self.folder / "s3.json", self.ports)

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def client(self):
        # Explicit credentials: boto3's default session keeps the first ones it found.
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key, aws_secret_access_key=self.secret,
                            region_name="us-east-1")

    def env(self):
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.url,
                "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def weed(tmp_path, monkeypatch):
    (tmp_path / "weed").mkdir()
    server = Weed(tmp_path / "weed")
    server.start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        if server.process.poll() is None:
            server.kill()


def big_output(tmp_path: Path, megabytes: int = 96) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    for i in range(2):
        (folder / f"shard-{i}.bin").write_bytes(os.urandom(megabytes * 2**20 // 2))
    storage.write_manifest(folder, "merge", {"base_model": "x"}, {})
    return folder


def restart_during(weed: Weed, action, outage: float = 3.0, after: float = 0.5):
    """Run `action` in a thread; kill the server `after` seconds in, start it again `outage` seconds later."""
    outcome = {}

    def target():
        started = time.monotonic()
        try:
            outcome["value"] = action()
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(after)
    assert thread.is_alive(), "the transfer finished before the server went down: make it bigger"
    weed.kill()
    time.sleep(outage)
    weed.start()
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    return outcome


def test_upload_survives_the_server_restarting(weed, tmp_path):
    folder = big_output(tmp_path)
    outcome = restart_during(weed, lambda: storage.publish(folder, f"s3://{BUCKET}/runs/a"))
    fetched = storage.fetch(f"s3://{BUCKET}/runs/a", tmp_path / "back")  # verifies every sha256
    assert sorted(p.name for p in fetched.iterdir()) == ["manifest.json", "shard-0.bin", "shard-1.bin"]
    print(f"publish with a 3 s server outage: {outcome['seconds']:.1f} s")


def test_download_survives_the_server_restarting(weed, tmp_path):
    # A fetch runs at 200+ MB/s on a fast machine: big enough to still be running when the server goes down.
    storage.publish(big_output(tmp_path, megabytes=384), f"s3://{BUCKET}/runs/b")
    outcome = restart_during(weed, lambda: storage.fetch(f"s3://{BUCKET}/runs/b", tmp_path / "back"), after=0.3)
    assert (outcome["value"] / "manifest.json").exists()
    print(f"fetch with a 3 s server outage: {outcome['seconds']:.1f} s")


def test_server_gone_for_good_is_a_clear_error_after_the_retry_budget(weed, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "TRANSFER_RETRY_DELAYS", (1, 2))
    folder = big_output(tmp_path, megabytes=2)
    weed.kill()
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"S3 unreachable for s3://{BUCKET}/runs/c") as caught:
        storage.publish(folder, f"s3://{BUCKET}/runs/c")
    elapsed = time.monotonic() - started
    assert weed.secret not in str(caught.value)
    assert 3 <= elapsed < 60, elapsed
    with pytest.raises(StorageError, match="S3 unreachable"):
        storage.fetch(f"s3://{BUCKET}/runs/c", tmp_path / "back")
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.partial").exists()


def test_manifest_entries_cannot_escape_the_target(weed, tmp_path):
    client = weed.client()
    client.put_object(Bucket=BUCKET, Key="evil/x.bin", Body=b"x")
    manifest = {"stage": "merge", "files": {"../../escaped.bin": {"sha256": "0" * 64, "size": 1}}, "lineage": {}, "metrics": {}}
    client.put_object(Bucket=BUCKET, Key="evil/manifest.json", Body=json.dumps(manifest).encode())
    with pytest.raises(StorageError, match="outside"):
        storage.fetch(f"s3://{BUCKET}/evil", tmp_path / "target" / "back")
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "target" / "back").exists()


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a/b/../../../x"])
def test_keys_that_would_escape_are_refused(tmp_path, name):
    with pytest.raises(StorageError, match="outside"):
        storage.inside(tmp_path / "root", name)


@pytest.mark.parametrize("name", ["a", "a/b/c.bin", "a/../b", "./c"])
def test_keys_inside_are_kept(tmp_path, name):
    assert storage.inside(tmp_path / "root", name).is_relative_to((tmp_path / "root").resolve())


RETRY = """
import json, sys
from tuneforge.pipelines.stage_runner import run_stage
print(json.dumps(run_stage("sft", sys.argv[1], {"data": sys.argv[3]}, sys.argv[4], parent_run=sys.argv[2])))
"""


def test_a_retry_on_another_machine_resumes_from_the_checkpoints_on_s3(weed, tmp_path, monkeypatch):
    """What a KFP retry does: the same task again, in a fresh pod with an empty disk. The first attempt is killed
    after a checkpoint reached S3; the second starts from an empty folder, resumes from S3 and finishes."""
    from conftest import alpaca_rows, cli, make_config, write_jsonl

    from tuneforge.config import load_config

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    config_path = make_config(tmp_path, [write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(40))],
                              storage={"uri": f"s3://{BUCKET}/runs"})
    assert cli("stage", "data-prep", "--config", config_path, "--output", tmp_path / "data").exit_code == 0
    config = load_config(config_path, ["sft.max_steps=200", "sft.save_steps=10", "sft.batch_size=2", "sft.logging_steps=1"])
    import mlflow

    parent = mlflow.MlflowClient(tracking_uri).create_run(mlflow.MlflowClient(tracking_uri).create_experiment("retry")).info.run_id
    mirror = f"runs/test/{parent}/sft.checkpoints"

    def attempt(node):
        return subprocess.Popen(
            [sys.executable, "-c", RETRY, config.model_dump_json(), parent, str(tmp_path / "data"), str(tmp_path / node / "sft")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())

    first = attempt("node-a")
    client, deadline = weed.client(), time.monotonic() + 300
    while "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{mirror}/checkpoint-20/manifest.json"):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    done_at_kill = len(re.findall(r"\{'loss': ", "".join(first.communicate())))  # the trainer prints to stdout

    second = attempt("node-b")
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-3000:]
    resumed_from = int(re.search(r"resuming from \S*node-b/sft\.checkpoints/checkpoint-(\d+)", stderr).group(1))
    assert resumed_from >= 20 and 0 <= done_at_kill - resumed_from <= 10, (done_at_kill, resumed_from)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["metrics"]["steps"] == 200 and result["uri"] == f"s3://{BUCKET}/runs/test/{parent}/sft"
    assert len(re.findall(r"\{'loss': ", stdout + stderr)) == 200 - resumed_from  # only the steps after the checkpoint
    # Published, and the mirrored checkpoints are gone once the output is.
    assert storage.fetch(result["uri"], tmp_path / "fetched").is_dir()
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=mirror)
    print(f"retry on a fresh machine resumed from step {resumed_from}; the kill lost {done_at_kill - resumed_from} steps")
