"""Property-based tests: generated data files (every format and file type, wrong types, missing and extra keys, odd
encodings, huge and empty fields, nesting, broken lines) and generated configs. Reading either succeeds or fails
with a message that names the file (and line or key): never another exception, and data-prep leaves no output behind
when it fails. The whole module is bounded to about two minutes; `-s` prints how many cases ran."""

import csv
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import assert_no_output, cli, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.chat_templates import CHATML
from tuneforge.components.data_prep import load_rows
from tuneforge.config import DataSettings, DataSource, load_config
from tuneforge.data.render import Renderer, prepare_sft
from tuneforge.errors import ConfigError, DataError
from tuneforge.tiny import _bpe_tokenizer

KEYS = ["instruction", "input", "output", "context", "response", "messages", "conversations", "prompt", "completion",
        "text", "chosen", "rejected", "question", "label", "system", "role", "content", "from", "value", "type", "score"]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", "developer", "robot", ""]
COUNTS: dict[str, int] = {}

text = st.one_of(st.text(max_size=40), st.just(""), st.just("   "), st.text(min_size=2000, max_size=3000),
                 st.sampled_from(["\n\nHuman: hi\n\nAssistant: yo", "{{ raise_exception('x') }}", "<|im_end|>", "\x00"]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), text)
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4)), max_leaves=10)
turn = st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES) | value, "content": text | value,
                                           "from": st.sampled_from(ROLES) | value, "value": text | value,
                                           "tool_calls": value})
plausible = st.one_of(
    st.fixed_dictionaries({"instruction": text, "output": text}, optional={"input": text | value, "system": value}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | value}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=4) | value}),
    st.fixed_dictionaries({"prompt": text, "completion": text}, optional={"label": value, "text": value}),
    st.fixed_dictionaries({"chosen": text | st.lists(turn, max_size=3), "rejected": text | st.lists(turn, max_size=3)},
                          optional={"prompt": text | value, "messages": value, "score": value}),
    st.fixed_dictionaries({"text": text | value}),
)
record = st.one_of(plausible, st.dictionaries(st.sampled_from(KEYS), value, max_size=5), value)
data_file = st.tuples(
    st.lists(record, max_size=6),
    st.sampled_from(["jsonl", "json", "csv", "parquet"]),
    st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]),
    st.sampled_from([None, "truncated", "garbage-line", "empty"]),
)


def write(folder, records, suffix, encoding, damage) -> object:
    path = folder / f"data.{suffix}"
    if suffix == "parquet":
        try:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([r if isinstance(r, dict) else {"value": r} for r in records]), buffer)
            raw = buffer.getvalue()
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            raw = b"PAR1 not really parquet"
    else:
        if suffix == "jsonl":
            body = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        elif suffix == "json":
            body = json.dumps(records, ensure_ascii=False)
        else:
            out = io.StringIO()
            keys = sorted({k for r in records if isinstance(r, dict) for k in r}) or ["text"]
            writer = csv.DictWriter(out, keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                             for r in records if isinstance(r, dict))
            body = out.getvalue()
        raw = body.encode(encoding, errors="surrogatepass" if encoding.startswith("utf-8") else "replace")
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage-line":
        raw += b"\n{not json at all\n\xff\xfe\n"
    elif damage == "empty":
        raw = b""
    path.write_bytes(raw)
    return path


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    started = time.monotonic()
    yield
    print(f"\nfuzz cases in {time.monotonic() - started:.0f} s:", json.dumps(COUNTS))


@pytest.fixture(scope="module")
def renderer():
    return Renderer(_bpe_tokenizer()[0], CHATML, system_prompt=None)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data_file=data_file, on_error=st.sampled_from(["fail", "skip"]))
def test_reading_any_file_succeeds_or_names_the_file(tmp_path_factory, renderer, data_file, on_error):
    """The reading, format detection, normalising, rendering and masking of data-prep, on any file."""
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = write(folder, *data_file)
    _count("data files")
    try:
        rows, _ = load_rows(DataSettings(sources=[DataSource(path=str(path))], on_error=on_error), {})
        sft = [r for r in rows if r.kind == "sft"]
        prepare_sft(renderer, sft, None)
        for row in rows:
            if row.kind != "sft":
                renderer.preference(row)
    except DataError as exc:
        assert str(path) in str(exc), exc
        _count("data files refused")


def valid_config() -> dict:
    return {"name": "fuzz", "base_model": {"source": "tiny-llama"},
            "data": {"sources": [{"path": "data.jsonl"}], "max_length": 64},
            "sft": {"method": "lora", "max_steps": 2}, "dpo": {"enabled": True, "beta": 0.1}}


SECTIONS = ["name", "base_model", "data", "sft", "dpo", "merge", "evaluate", "export", "storage", "registry", "cluster",
            "tracking", "workdir", "nope"]
FIELDS = ["source", "sources", "max_length", "method", "learning_rate", "beta", "types", "uri", "resources", "enabled",
          "max_chosen_logp_drop", "rpo_alpha", "leakage", "weight", "approval", "retries", "lora", "r", "path", "bogus"]
mutation = st.tuples(st.sampled_from(SECTIONS), st.sampled_from(FIELDS) | st.none(), value | st.sampled_from(
    [-1, 0, 1e-12, "auto", "s3://b/p", "bf16", ["q8_0"], {"default": {"gpus": -1}}]))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(mutation, max_size=4), broken_yaml=st.sampled_from([None, ":\n- [", "\xff\xfe", "- just a list"]))
def test_loading_any_config_succeeds_or_names_the_file_and_key(tmp_path_factory, mutations, broken_yaml):
    folder = tmp_path_factory.mktemp("config", numbered=True)
    config = valid_config()
    for section, field, new in mutations:
        if field is None:
            config[section] = new
        elif isinstance(config.get(section), dict):
            config[section][field] = new
        else:
            config[section] = {field: new}
    path = folder / "config.yaml"
    if broken_yaml:
        path.write_bytes(broken_yaml.encode("utf-8", errors="surrogatepass"))
    else:
        try:
            path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
        except yaml.YAMLError:
            path.write_text("name: [")
    _count("configs")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc), exc
        _count("configs refused")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data_file=data_file)
def test_the_data_prep_stage_exits_0_or_2_and_leaves_nothing_when_it_fails(tmp_path_factory, data_file):
    """The whole stage, as `tuneforge stage data-prep` runs it (tiny model's tokenizer, MLflow in SQLite)."""
    folder = tmp_path_factory.mktemp("stage", numbered=True)
    path = write(folder, *data_file)
    config = make_config(folder, [path], data={"on_error": "skip", "max_length": 64})
    result = cli("stage", "data-prep", "--config", config, "--output", folder / "out")
    _count("data-prep runs")
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr, result.exception)
    if result.exit_code == 2:
        _count("data-prep runs refused")
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert str(path) in result.stderr or "no SFT training rows" in result.stderr, result.stderr
        assert_no_output(folder / "out")
    else:
        assert (folder / "out" / "manifest.json").exists()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(mutation, max_size=3))
def test_tuneforge_validate_exits_0_or_2_with_one_line(tmp_path_factory, mutations):
    folder = tmp_path_factory.mktemp("validate", numbered=True)
    config = valid_config()
    for section, field, new in mutations:
        if field is not None and isinstance(config.get(section), dict):
            config[section][field] = new
        else:
            config[section] = new
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    result = cli("validate", path)
    _count("validate runs")
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr, result.exception)
    if result.exit_code == 2:
        assert result.stderr.startswith(f"error: {path}") and "Traceback" not in result.stderr
