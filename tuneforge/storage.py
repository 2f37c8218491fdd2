"""Where things are kept: stage outputs that are complete or absent (staged in a sibling folder, a manifest with
checksums written last, then renamed into place), their copies on S3, and the local cache of downloads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneforge import env
from tuneforge.errors import IncompleteOutputError, StorageError, StorageUnreachableError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """Base models, converted weights and downloaded data ($TUNEFORGE_CACHE, else ~/.cache/tuneforge)."""
    return Path(os.environ.get(env.CACHE, Path.home() / ".cache" / "tuneforge"))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `output`, on any failure it is deleted.

    The caller writes the manifest last (`write_manifest`); a folder without one is never complete.
    """
    output = Path(output).resolve()
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if not (staging / MANIFEST).exists():
            raise IncompleteOutputError(f"{output}: stage finished without writing its manifest")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        old = output.with_name(output.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def runtime() -> dict[str, Any]:
    """Where the stage ran: its user, whether it could write the root filesystem (a pod's is read-only), the image."""
    return {"uid": os.getuid(), "root_writable": os.access("/", os.W_OK),
            "image_version": os.environ.get(env.IMAGE_VERSION)}


def write_manifest(folder: Path, stage: str, lineage: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    lineage = {**lineage, "runtime": runtime()}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(folder))] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "stage": stage,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lineage": lineage,
        "metrics": metrics,
        "files": files,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def content_digest(manifest: dict[str, Any]) -> str:
    """One sha256 over a stage output's files (names and checksums): equal outputs, equal digests."""
    files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: Path, stage: str | tuple[str, ...] | None = None, verify: bool = False) -> dict[str, Any]:
    """Read a complete stage output; raise a clear error when it is missing, partial or of another stage."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise IncompleteOutputError(
            f"{folder}: not a complete tuneforge stage output (no {MANIFEST}); rerun the stage that produces it"
        )
    manifest = json.loads(path.read_text())
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and manifest["stage"] not in stages:
        raise IncompleteOutputError(
            f"{folder}: is the output of stage {manifest['stage']!r}, expected {' or '.join(stages)}"
        )
    if verify:
        for name, entry in manifest["files"].items():
            file = folder / name
            if not file.exists() or sha256_file(file) != entry["sha256"]:
                raise IncompleteOutputError(f"{file}: missing or checksum mismatch against {path}")
    return manifest


# ---------------------------------------------------------------- S3


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def published_uri(storage_uri: str | None, name: str, stage: str) -> str | None:
    """Where the pipeline publishes a stage's output: STORAGE_URI/NAME/RUN_ID/STAGE, when it publishes to S3."""
    run_id = os.environ.get(env.RUN_ID)
    if not storage_uri or not run_id:
        return None
    return f"{storage_uri.rstrip('/')}/{name}/{run_id}/{stage}"


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key.strip("/")


def s3_client(endpoint_url: str | None = None):
    """A boto3 client: endpoint and credentials from the arguments or the environment (AWS_* variables, profiles,
    instance roles, as boto3 finds them); transient errors are retried with backoff."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=120)
    # A session of its own: boto3's default session caches the credentials it first found.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), config=config)


ACCESS_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")
NOT_FOUND = ("NoSuchBucket", "NoSuchKey", "404")


def _error_code(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    # The transfer manager wraps the ClientError in its message.
    found = re.search(r"An error occurred \((\w+)\)", str(exc))
    return found.group(1) if found else ""


@contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, S3UploadFailedError) as exc:
        code = _error_code(exc)
        if code in ACCESS_DENIED:
            raise StorageError(
                f"S3 refused access to {uri} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint"
            ) from None
        if code in NOT_FOUND:
            raise StorageError(f"{uri}: not found in S3 ({code})") from None
        raise StorageError(f"S3 error on {uri}: {code or exc}") from None
    except BotoCoreError as exc:
        raise StorageUnreachableError(f"S3 unreachable for {uri}: {exc}") from None


def inside(root: Path, name: str) -> Path:
    """`root / name`, refusing names (S3 keys, manifest entries) that would land outside `root`."""
    target = (root / name).resolve()
    if name.startswith("/") or not target.is_relative_to(root.resolve()):
        raise StorageError(f"refusing {name!r}: it would be written outside {root}")
    return target


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4)


# Beyond botocore's own retries of each request: a whole file transfer is retried when the server went away
# mid-transfer (a restarted server may have lost a multipart upload botocore cannot resume).
TRANSFER_RETRY_DELAYS = (2, 4, 8, 16)


def _retried(transfer: Callable[[], Any], what: str) -> Any:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt, delay in enumerate((*TRANSFER_RETRY_DELAYS, None), start=1):
        try:
            return transfer()
        except (BotoCoreError, S3UploadFailedError, ClientError) as exc:
            if delay is None or _error_code(exc) in ACCESS_DENIED + NOT_FOUND:
                raise
            log.warning("S3 transfer of %s failed (attempt %d): %s; retrying in %ss", what, attempt, exc, delay)
            time.sleep(delay)


def publish(folder: Path, uri: str, endpoint_url: str | None = None) -> str:
    """Upload a complete stage output to `uri`, its manifest last: a reader that finds the manifest finds every file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    with s3_errors(uri):
        for name in [*manifest["files"], MANIFEST]:
            key = f"{prefix}/{name}"
            _retried(lambda name=name, key=key: client.upload_file(str(folder / name), bucket, key, Config=_transfer_config()),
                     f"{uri}/{name}")
    return f"s3://{bucket}/{prefix}"


def fetch(uri: str, folder: Path, endpoint_url: str | None = None) -> Path:
    """Download a published stage output, verifying every file's sha256; the folder appears only when all match."""
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    with staged_output(folder) as staging:
        with s3_errors(f"{uri}/{MANIFEST}"):
            try:
                body = _retried(lambda: client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read(),
                                f"{uri}/{MANIFEST}")
            except client.exceptions.NoSuchKey:
                raise IncompleteOutputError(f"{uri}: no {MANIFEST}, so not a complete stage output") from None
        manifest = json.loads(body)
        with s3_errors(uri):
            for name, entry in manifest["files"].items():
                target = inside(staging, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                key = f"{prefix}/{name}"
                _retried(lambda key=key, target=target: client.download_file(bucket, key, str(target),
                                                                             Config=_transfer_config()),
                         f"{uri}/{name}")
                if sha256_file(target) != entry["sha256"]:
                    raise StorageError(f"{uri}/{name}: checksum mismatch with its manifest (corrupted or overwritten)")
        (staging / MANIFEST).write_bytes(body)
    return Path(folder).resolve()


def put_text(uri: str, text: str, endpoint_url: str | None = None) -> None:
    bucket, key = split_s3(uri)
    with s3_errors(uri):
        s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=text.encode())


def get_text(uri: str, endpoint_url: str | None = None) -> str | None:
    """The object's text, or None when there is no such object."""
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    with s3_errors(uri):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None


def subfolders(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The names of the folders directly under an S3 prefix."""
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    with s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", Delimiter="/")
        return [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for page in pages for p in page.get("CommonPrefixes", [])]


def delete(uri: str, endpoint_url: str | None = None) -> None:
    """Delete every object under an S3 prefix, the manifests first so nothing half-deleted looks complete."""
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    with s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
        keys = sorted((o["Key"] for page in pages for o in page.get("Contents", [])), key=lambda k: not k.endswith(MANIFEST))
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]})


def objects(uri: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The object at `uri`, or every object under it as a prefix, as they are now: key, ETag, size and version id
    (where the bucket keeps versions), sorted by key; empty when there is none."""
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    with s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        found = [o for page in pages for o in page.get("Contents", []) if o["Key"] == key or
                 o["Key"].startswith(key.rstrip("/") + "/")]
        described = []
        for item in sorted(found, key=lambda o: o["Key"]):
            # head_object has the version id where the bucket keeps versions; the listing does not.
            head = client.head_object(Bucket=bucket, Key=item["Key"])
            described.append({"key": f"s3://{bucket}/{item['Key']}", "etag": head["ETag"].strip('"'),
                              "size": head["ContentLength"], "version": head.get("VersionId")})
    return described


def download(uri: str, target: Path, endpoint_url: str | None = None) -> Path:
    """Download one object, or every object under a prefix (a model directory), to `target`; it appears only
    when complete. Transfer integrity is checked by the S3 client (content length, and MD5 for single-part objects)."""
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    target = Path(target).resolve()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.unlink(missing_ok=True)
    with s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        try:
            if keys:
                for name in keys:
                    dest = inside(staging, name[len(key.rstrip("/")) + 1 :])
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(bucket, name, str(dest), Config=_transfer_config())
            else:
                staging.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(staging), Config=_transfer_config())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True) if staging.is_dir() else staging.unlink(missing_ok=True)
            raise
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
