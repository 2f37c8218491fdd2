"""Reading data files: JSONL, JSON, CSV and Parquet, local or on S3, as (location, record) pairs.

A location is `file:line` (or `file: row N` where lines do not apply), so every later error can name it. A line that
is not valid JSON becomes a RowError record: whether it stops data-prep or is skipped is data.on_error's call.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from tuneforge import storage
from tuneforge.data.formats import RowError
from tuneforge.errors import DataError, StorageError


def read_records(path: str) -> list[tuple[str, Any]]:
    """Return (location, record) pairs; location is `file:line` (or `file:row N` where lines do not apply)."""
    if storage.is_s3(path):
        try:
            folder = storage.cache_dir() / "data" / hashlib.sha256(path.encode()).hexdigest()[:16]
            local = storage.download(path, folder / Path(path).name)
        except StorageError as exc:
            raise DataError(str(exc)) from None
        return [(where.replace(str(local), path), record) for where, record in read_records(str(local))]
    if "://" in path:
        raise DataError(f"{path}: only local files and s3:// URIs are supported as data sources")
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(file)
    elif suffix == ".json":
        records = _read_json(file)
    elif suffix == ".csv":
        records = _read_csv(file)
    elif suffix == ".parquet":
        records = _read_parquet(file)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json, .csv or .parquet")
    if not records:
        raise DataError(f"{path}: file holds no rows")
    return records


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None


def _read_jsonl(file: Path) -> list[tuple[str, Any]]:
    records = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{file}:{number}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                records.append((where, RowError(f"invalid JSON: {exc.msg} at column {exc.colno}")))
    return records


def _read_json(file: Path) -> list[tuple[str, Any]]:
    text = _decode(file.read_bytes(), str(file))
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{file}: expected a JSON list of rows (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of rows, got {type(data).__name__}")
    return [(f"{file}: row {i + 1}", record) for i, record in enumerate(data)]


def _read_csv(file: Path) -> list[tuple[str, Any]]:
    text = _decode(file.read_bytes(), str(file))
    reader = csv.DictReader(text.splitlines(keepends=True))
    records = []
    try:
        for record in reader:
            where = f"{file}:{reader.line_num}"
            if None in record:
                records.append((where, RowError("more fields than the header names")))
            else:
                records.append((where, record))
    except csv.Error as exc:
        raise DataError(f"{file}:{reader.line_num}: malformed CSV: {exc}") from None
    return records


def _read_parquet(file: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several types for broken files
        raise DataError(f"{file}: not a readable Parquet file: {exc}") from None
    return [(f"{file}: row {i + 1}", record) for i, record in enumerate(table.to_pylist())]


def lm_eval_task(path: str) -> dict[str, Any]:
    """A local lm-eval task file as its config, its data_files made absolute: lm-eval reads them relative to the
    working directory, and tuneforge keeps them beside the file."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"evaluate.lm_eval.tasks: {path}: cannot read the task file: {exc}") from None
    files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        spec["dataset_kwargs"]["data_files"] = {k: str(Path(path).parent / v) for k, v in files.items()}
    return spec
