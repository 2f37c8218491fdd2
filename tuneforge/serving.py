"""llama.cpp's OpenAI-compatible server (llama-cpp-python's server extra) on one GGUF file. serve-check, `tuneforge
serve`, the chart's serving container and the manifests `tuneforge deploy` renders all run the command built here, so
what the pipeline checked is what a cluster serves: the chat template, BOS and EOS the file carries, nothing of ours.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneforge import env as tf_env
from tuneforge import storage
from tuneforge.errors import ServeCheckError, SetupError, StorageError

PORT = 8080


def server_command(gguf: Path | str, port: int = PORT, context_length: int = 2048, host: str = "127.0.0.1",
                   alias: str = "served", python: str = sys.executable) -> list[str]:
    """No chat_format: llama-cpp-python then renders with the template inside the file."""
    return [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias, "--host", host,
            "--port", str(port), "--n_ctx", str(context_length), "--n_threads", str(len(tf_env.usable_cpus()))]


def require_server() -> None:
    try:
        import llama_cpp.server  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        raise SetupError(f"serving needs llama-cpp-python's server and the openai client ({exc}): pip install "
                         "'tuneforge[gguf]' (make setup does), or set serve_check.enabled: false") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log_path: Path, what: str) -> None:
    """Until GET URL/v1/models answers; a server that exits or does not answer in time is an error with its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServeCheckError(f"llama.cpp's server did not start on {what} (exit {process.returncode}): {_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise ServeCheckError(f"llama.cpp's server on {what} did not answer within {timeout:.0f} s: "
                                      + _tail(log_path)) from None
            time.sleep(0.3)


@contextmanager
def served(gguf: Path, context_length: int, timeout: float, log_path: Path, alias: str = "served") -> Iterator[str]:
    """The OpenAI base URL of a server on GGUF, started on a free loopback port and stopped (its whole process group)
    on leaving, failures included."""
    require_server()
    port = free_port()
    with open(log_path, "ab") as server_log:
        process = subprocess.Popen(server_command(gguf, port, context_length, alias=alias), stdout=server_log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, timeout, log_path, Path(gguf).name)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "no output"


def published_entry(uri: str, endpoint_url: str | None = None) -> dict[str, int | str]:
    """The sha256 and size of a GGUF file an export-gguf output published (s3://.../export-gguf/NAME.gguf), from the
    manifest beside it."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    manifest = storage.get_text(f"{folder}/{storage.MANIFEST}", endpoint_url)
    if manifest is None:
        raise StorageError(f"{folder}: no {storage.MANIFEST}, so {name} is not from a complete export-gguf output")
    entry = json.loads(manifest)["files"].get(name)
    if entry is None:
        raise StorageError(f"{uri}: not a file of the export-gguf output at {folder}")
    return entry


def fetch_gguf(uri: str, models_dir: Path, endpoint_url: str | None = None) -> Path:
    """A published GGUF file in MODELS_DIR, its sha256 checked against its manifest; it appears only when it matches."""
    name = uri.rstrip("/").rpartition("/")[2]
    entry = published_entry(uri, endpoint_url)
    target = Path(models_dir) / name
    if target.exists() and storage.sha256_file(target) == entry["sha256"]:
        return target
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    staging = storage.download(uri, target.with_name(f".{name}.download"), endpoint_url)
    if storage.sha256_file(staging) != entry["sha256"]:
        staging.unlink()
        raise StorageError(f"{uri}: checksum mismatch with its manifest (corrupted or overwritten)")
    os.replace(staging, target)
    return target
