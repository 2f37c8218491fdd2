"""Stage data-prep: read training files, normalise every known row format to one schema, render with the chat
template, tokenize with loss masks, drop duplicates and rows outside the length limits, split train/eval, and
report what happened.

Inputs: the files named in `data.sources` (and `data.eval_tasks`).
Outputs: sft_{train,eval}.parquet (messages/text, rendered text, input_ids, assistant_masks),
preference_{train,eval}.jsonl (rendered prompt/chosen/rejected), eval_tasks.jsonl, report.md,
token_lengths.png, data_report.json, manifest.json (chat template, its hash, special tokens, data hash).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import multiprocessing
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge import chat_templates, models, storage, tracking
from tuneforge.config import Config, DataSource

log = logging.getLogger(__name__)

STAGE = "data-prep"
FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the reason."""


class RowError(ValueError):
    pass


@dataclass
class Row:
    """A row in the common schema: `messages` or `text` for SFT; `messages` + chosen/rejected for preference."""

    where: str
    kind: str  # "sft" or "preference"
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    rendered: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps([self.messages, self.text, self.chosen, self.rejected], sort_keys=True)


# ---------------------------------------------------------------- reading files


def read_records(path: str) -> list[tuple[str, Any]]:
    """Return (location, record) pairs; location is `file:line` (or `file:row N` where lines do not apply)."""
    if path.startswith("s3://"):
        try:
            local = storage.download(path, models.cache_dir() / "data" / hashlib.sha256(path.encode()).hexdigest()[:16] / Path(path).name)
        except storage.StorageError as exc:
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


# ---------------------------------------------------------------- formats


def detect_format(keys: set[str], where: str) -> str:
    matches = []
    if {"chosen", "rejected"} <= keys:
        matches.append("preference")
    if "messages" in keys:
        matches.append("messages")
    if "conversations" in keys:
        matches.append("sharegpt")
    if "instruction" in keys and keys & {"output", "response"}:
        matches.append("alpaca")
    if {"prompt", "completion"} <= keys:
        matches.append("prompt_completion")
    if "text" in keys:
        matches.append("text")
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(sorted(keys)) or "none"
    if not matches:
        raise DataError(
            f"{where}: unknown row format; keys found: {found}. Formats considered: alpaca (instruction, "
            "output[, input]), messages (messages), sharegpt (conversations), prompt_completion (prompt, "
            "completion), text (text), preference (chosen, rejected[, prompt]). Set format in data.sources"
        )
    raise DataError(
        f"{where}: ambiguous row format; keys found: {found} match {', '.join(matches)}. "
        "Set format in data.sources to pick one"
    )


def _string(record: dict, key: str, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise RowError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def _text(content: Any) -> Any:
    """OpenAI-style content parts ([{"type": "text", "text": ...}]) become plain text; other values pass through."""
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def _messages(value: Any, key: str, sharegpt: bool = False) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV and some Parquet exports store turns as JSON text
        except json.JSONDecodeError:
            raise RowError(f"field {key!r} must be a list of turns, got a string that is not JSON") from None
    if not isinstance(value, list) or not value:
        raise RowError(f"field {key!r} must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        # ShareGPT exports use from/value, some use role/content inside "conversations"; accept both.
        role_key, content_key = ("from", "value") if sharegpt and "from" in turn else ("role", "content")
        role = turn.get(role_key)
        content = _text(turn.get(content_key))
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise RowError(f"{key}[{i}].from: {role!r} is not one of {', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            raise RowError(f"{key}[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{key}[{i}].{content_key} must be a string, got {type(content).__name__}")
        turns.append({"role": role, "content": content})
    return turns


def normalize(record: Any, fmt: str, where: str) -> Row:
    if isinstance(record, RowError):
        raise record
    if not isinstance(record, dict):
        raise RowError(f"expected an object with named fields, got {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        # Dolly-style rows name the fields context/response.
        input_key = "input" if "input" in record else "context"
        extra = record.get(input_key) or ""
        if not isinstance(extra, str):
            raise RowError(f"field {input_key!r} must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        answer = _string(record, "response" if "response" in record and "output" not in record else "output")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
        return Row(where, "sft", messages=messages)
    if fmt == "messages":
        messages = _messages(record.get("messages"), "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("no assistant turn: nothing to learn from this row")
        return Row(where, "sft", messages=messages)
    if fmt == "sharegpt":
        messages = _messages(record.get("conversations"), "conversations", sharegpt=True)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("no gpt/assistant turn: nothing to learn from this row")
        return Row(where, "sft", messages=messages)
    if fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": _string(record, "prompt")},
            {"role": "assistant", "content": _string(record, "completion")},
        ]
        return Row(where, "sft", messages=messages)
    if fmt == "text":
        return Row(where, "sft", text=_string(record, "text"))
    if fmt == "preference":
        return _preference(record, where)
    raise RowError(f"unknown format {fmt!r}")


def _answer(record: dict, key: str) -> tuple[list[dict[str, str]] | None, str]:
    """A chosen/rejected value: a string, or a message list whose last turn is the assistant's answer."""
    value = record.get(key)
    if value is None:
        raise RowError(f"missing field {key!r}")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"field {key!r} is empty")
        return None, value
    turns = _messages(value, key)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"{key}: the last turn must be the assistant's answer")
    return turns[:-1], turns[-1]["content"]


def _preference(record: dict, where: str) -> Row:
    chosen_context, chosen = _answer(record, "chosen")
    rejected_context, rejected = _answer(record, "rejected")
    prompt = record.get("prompt", record.get("question"))  # orca_dpo_pairs-style rows say question
    if prompt is None:
        if not chosen_context:
            raise RowError("missing field 'prompt' (and chosen holds no prompt turns)")
        if chosen_context != rejected_context:
            raise RowError("chosen and rejected hold different prompt turns")
        messages = chosen_context
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("field 'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _messages(prompt, "prompt")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical: no preference to learn")
    if isinstance(record.get("system"), str) and record["system"].strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": record["system"]}, *messages]
    return Row(where, "preference", messages=messages, chosen=chosen, rejected=rejected)


# ---------------------------------------------------------------- rendering and tokenizing


class Renderer:
    def __init__(self, tokenizer, template: str, system_prompt: str | None):
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        self.stop_tokens: set[str] = set()
        self._stops_in: dict[str, set[str]] = {}
        self._compiled = self._compiled_template()

    def __getstate__(self) -> dict[str, Any]:  # for spawned workers: a compiled template does not pickle
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compiled = self._compiled_template()

    def _compiled_template(self):
        """transformers' compiled (sandboxed, cached) template, rendered directly: apply_chat_template's per-call
        overhead is larger than the rendering itself. Used only when it renders a probe exactly as
        apply_chat_template does; otherwise every render goes through apply_chat_template."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            self._template_kwargs = {"tools": None, "documents": None, **self.tokenizer.special_tokens_map}
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
            for generation_prompt in (False, True):
                direct = compiled.render(messages=probe, add_generation_prompt=generation_prompt,
                                         **self._template_kwargs)
                if direct != self._apply(probe, generation_prompt):
                    return None
            return compiled
        except Exception:  # a private transformers API: any change there means the public path
            return None

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if self._compiled is None:
            return self._apply(messages, generation_prompt)
        return self._compiled.render(messages=messages, add_generation_prompt=generation_prompt,
                                     **self._template_kwargs)

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def sft(self, row: Row) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans the model learns (assistant turns, or all raw text)."""
        if row.text is not None:
            text = row.text + (self.tokenizer.eos_token or "")
            return text, [(0, len(text))]
        messages = self.with_system(row.messages)
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True) if i else ""
            upto = full if i + 1 == len(messages) else self.render(messages[: i + 1])
            if not (full.startswith(before) and full.startswith(upto)):
                raise chat_templates.TemplateError(
                    "the chat template renders a conversation differently from its first turns (it is not "
                    "prefix-stable), so the assistant tokens cannot be located; pick data.chat_template"
                )
            scaffold = upto[len(before) :].replace(message["content"], "")
            stops = self._stops_in.get(scaffold)  # the template's text around an answer: mostly the same one
            if stops is None:
                stops = {t for t in self.special if t and t in scaffold}
                if len(self._stops_in) < 256:
                    self._stops_in[scaffold] = stops
            self.stop_tokens |= stops
            spans.append((len(before), len(upto)))
        return full, spans

    def preference(self, row: Row) -> dict[str, str]:
        messages = self.with_system(row.messages)
        prompt = self.render(messages, generation_prompt=True)
        out = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            full = self.render([*messages, {"role": "assistant", "content": getattr(row, key)}])
            if not full.startswith(prompt):
                raise chat_templates.TemplateError(
                    "the chat template's generation prompt is not a prefix of the rendered answer; "
                    "pick data.chat_template"
                )
            answer = full[len(prompt) :]
            eos = self.tokenizer.eos_token
            # trl appends eos to answers that do not end with it; the turn's trailing newline would double it.
            if eos and answer.rstrip().endswith(eos):
                answer = answer.rstrip()
            out[key] = answer
        return out


def tokenize_with_masks(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]):
    """Token ids, and masks that are 1 for the (non-empty) tokens lying wholly inside one of a row's spans."""
    if not texts:
        return [], []
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    masks = [_mask(offsets, row_spans) for offsets, row_spans in zip(encoded["offset_mapping"], spans, strict=True)]
    return encoded["input_ids"], masks


def _mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    if len(spans) == 1:
        ((s, e),) = spans
        return [1 if s <= a and b <= e and a < b else 0 for a, b in offsets]
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    ordered = all(s <= e for s, e in spans) and all(ends[i] <= starts[i + 1] for i in range(len(spans) - 1))
    if not ordered:  # overlapping or unsorted: test every span
        return [1 if a < b and any(s <= a and b <= e for s, e in spans) else 0 for a, b in offsets]
    # Sorted, disjoint spans: only the last span starting at or before a token can hold it.
    masks = []
    for a, b in offsets:
        i = bisect.bisect_right(starts, a) - 1
        masks.append(1 if a < b and i >= 0 and b <= ends[i] else 0)
    return masks


# A pool worker's renderer, set by _init_worker.
_worker_renderer: Renderer | None = None


def _init_worker(renderer: Renderer) -> None:
    global _worker_renderer
    _worker_renderer = renderer


def _prepare_chunk(rows: list[Row], renderer: Renderer | None = None) -> tuple[list[tuple[str, list[int], list[int]]], set[str]]:
    """Render and tokenize SFT rows: (text, input_ids, assistant_masks) each, and the renderer's stop tokens."""
    renderer = renderer or _worker_renderer
    rendered = [renderer.sft(r) for r in rows]
    input_ids, masks = tokenize_with_masks(renderer.tokenizer, [t for t, _ in rendered], [s for _, s in rendered])
    prepared = [(text, ids, mask) for (text, _), ids, mask in zip(rendered, input_ids, masks, strict=True)]
    return prepared, renderer.stop_tokens


def prepare_sft(renderer: Renderer, rows: list[Row], num_proc: int | None) -> list[tuple[str, list[int], list[int]]]:
    """`_prepare_chunk` over all rows, in one process or in contiguous chunks over `num_proc` processes (the same
    result either way: every row is rendered and tokenized on its own). Adds the stop tokens to the renderer's."""
    workers = min(num_proc or 1, len(rows))
    if workers <= 1:
        return _prepare_chunk(rows, renderer)[0]
    size = -(-len(rows) // (workers * 4))  # a few chunks per process, so one slow chunk does not hold the rest
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    # fork: workers start at once with the renderer already loaded; elsewhere the platform's default.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    with context.Pool(workers, initializer=_init_worker, initargs=(renderer,)) as pool:
        results = pool.map(_prepare_chunk, chunks, chunksize=1)
    prepared = []
    for chunk, seen in results:
        prepared += chunk
        renderer.stop_tokens |= seen
    return prepared


def _normalized_key(key: str) -> str:
    return re.sub(r"\s+", " ", key.lower()).strip()


def _split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    n_eval = max(1, round(len(rows) * fraction))
    return rows[n_eval:], rows[:n_eval]


# ---------------------------------------------------------------- eval tasks


def read_eval_tasks(path: str, renderer: Renderer) -> list[dict[str, Any]]:
    tasks = []
    for where, record in read_records(path):
        try:
            if isinstance(record, RowError):
                raise record
            if not isinstance(record, dict):
                raise RowError(f"expected an object, got {type(record).__name__}")
            if "messages" in record:
                messages = _messages(record["messages"], "messages")
            else:
                messages = [{"role": "user", "content": _string(record, "prompt")}]
            metric = record.get("metric", "exact_match")
            if metric not in ("exact_match", "contains", "rouge_l"):
                raise RowError(f"metric {metric!r} is not one of exact_match, contains, rouge_l")
            messages = renderer.with_system(messages)
            tasks.append(
                {
                    "messages": messages,
                    "prompt": renderer.render(messages, generation_prompt=True),
                    "expected": _string(record, "expected"),
                    "metric": metric,
                }
            )
        except RowError as exc:
            raise DataError(f"{where}: {exc}") from None
    return tasks


# ---------------------------------------------------------------- the stage


def load_rows(sources: list[DataSource], on_error: str) -> tuple[list[Row], list[dict[str, str]], Counter]:
    rows, skipped, formats = [], [], Counter()
    for source in sources:
        records = read_records(source.path)
        fmt = source.format
        if fmt == "auto":
            first = next((r for _, r in records if isinstance(r, dict)), None)
            if first is None:
                where, record = records[0]
                detail = str(record) if isinstance(record, RowError) else f"got {type(record).__name__}"
                raise DataError(f"{where}: {detail}; cannot detect the format of {source.path}")
            fmt = detect_format(set(first), source.path)
        for where, record in records:
            try:
                row = normalize(record, fmt, where)
            except RowError as exc:
                if on_error == "fail":
                    raise DataError(f"{where}: {exc} (format {fmt}); set data.on_error: skip to drop such rows") from None
                skipped.append({"where": where, "reason": str(exc)})
                continue
            if source.split == "sft" and row.kind == "preference":
                raise DataError(f"{source.path}: split is sft but the rows are preference pairs")
            formats[fmt] += 1
            rows.append(row)
    return rows, skipped, formats


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    data = config.data
    started = time.perf_counter()
    rows, skipped, formats = load_rows(data.sources, data.on_error)
    model_path = models.resolve(config.base_model)
    tokenizer = models.load_tokenizer(model_path, config.base_model)
    template = chat_templates.resolve(data.chat_template, tokenizer)
    renderer = Renderer(tokenizer, template, data.system_prompt)
    eval_tasks = read_eval_tasks(data.eval_tasks, renderer) if data.eval_tasks else []

    dropped: Counter = Counter()
    unique, seen_exact, seen_normalized = [], set(), set()
    for row in rows:
        exact = row.key()
        normalized = _normalized_key(exact)
        if data.dedupe and exact in seen_exact:
            dropped["duplicate_exact"] += 1
            continue
        if data.dedupe and normalized in seen_normalized:
            dropped["duplicate_normalized"] += 1
            continue
        seen_exact.add(exact)
        seen_normalized.add(normalized)
        unique.append(row)

    sft_rows = [r for r in unique if r.kind == "sft"]
    prepared_at = time.perf_counter()
    sft_kept, lengths = [], []
    for row, (text, ids, mask) in zip(sft_rows, prepare_sft(renderer, sft_rows, data.num_proc), strict=True):
        prompt_tokens = mask.index(1) if 1 in mask else len(mask)
        if row.text is None and prompt_tokens >= data.max_length:
            message = (
                f"{row.where}: the prompt is {prompt_tokens} tokens, longer than data.max_length={data.max_length}: "
                "no answer token would fit"
            )
            if data.on_error == "fail":
                raise DataError(message + "; raise data.max_length or set data.on_error: skip")
            skipped.append({"where": row.where, "reason": message})
            continue
        if 1 not in mask:
            raise chat_templates.TemplateError(
                f"{row.where}: the chat template renders no assistant tokens to learn from"
            )
        if len(ids) > data.max_length:
            dropped["too_long"] += 1
            continue
        if len(ids) < data.min_length:
            dropped["too_short"] += 1
            continue
        lengths.append(len(ids))
        sft_kept.append({"messages": row.messages, "text": text, "input_ids": ids, "assistant_masks": mask})

    pref_kept = []
    for row in (r for r in unique if r.kind == "preference"):
        rendered_pair = renderer.preference(row)
        prompt_len = len(tokenizer(rendered_pair["prompt"], add_special_tokens=False)["input_ids"])
        answer_len = max(
            len(tokenizer(rendered_pair[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected")
        )
        if prompt_len + answer_len > data.max_length:
            dropped["too_long"] += 1
            continue
        lengths.append(prompt_len + answer_len)
        pref_kept.append(rendered_pair)

    if not sft_kept and not pref_kept:
        raise DataError(
            "data-prep produced no rows: "
            + (", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "no usable rows in the sources")
            + (f", {len(skipped)} malformed" if skipped else "")
        )
    if config.sft.loss_on == "assistant" and sft_kept and all(all(r["assistant_masks"]) for r in sft_kept):
        log.warning("every SFT row is raw text: loss_on=assistant has no prompt to mask")

    tokenized_at = time.perf_counter()
    sft_train, sft_eval = _split(sft_kept, data.eval_fraction, data.seed)
    pref_train, pref_eval = _split(pref_kept, data.eval_fraction, data.seed)
    template_sha = chat_templates.template_hash(template)
    report = {
        "rows_read": len(rows) + len(skipped),
        "rows_by_format": dict(formats),
        "malformed_skipped": len(skipped),
        "skipped_rows": skipped[:100],
        "dropped": dict(dropped),
        "sft_train": len(sft_train),
        "sft_eval": len(sft_eval),
        "preference_train": len(pref_train),
        "preference_eval": len(pref_eval),
        "eval_tasks": len(eval_tasks),
        "tokens_train": sum(len(r["input_ids"]) for r in sft_train),
        "token_length_max": max(lengths),
        "token_length_mean": round(sum(lengths) / len(lengths), 1),
    }
    lineage = {
        "base_model": config.base_model.source,
        "chat_template_sha256": template_sha,
        "config_hash": config.hash(),
        "code_version": tracking.code_version(),
    }
    with tracking.stage_run(config, STAGE, lineage) as mlrun, storage.staged_output(output) as out:
        _write_parquet(out / "sft_train.parquet", sft_train)
        _write_parquet(out / "sft_eval.parquet", sft_eval)
        _write_jsonl(out / "preference_train.jsonl", pref_train)
        _write_jsonl(out / "preference_eval.jsonl", pref_eval)
        _write_jsonl(out / "eval_tasks.jsonl", eval_tasks)
        data_sha = _hash_files(out)
        lineage["data_sha256"] = data_sha
        tracking.record("the data hash tag", tracking.set_lineage, {"data_sha256": data_sha})
        _plot_lengths(lengths, data.max_length, out / "token_lengths.png")
        (out / "data_report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(_report_markdown(report))
        (out / "chat_template.jinja").write_text(template)
        import mlflow

        tracking.record("the data report metrics", mlflow.log_metrics,
                        {k: v for k, v in report.items() if isinstance(v, (int, float))})
        for name in ("report.md", "data_report.json", "token_lengths.png", "chat_template.jinja"):
            tracking.record(f"artifact {STAGE}/{name}", mlflow.log_artifact, str(out / name), artifact_path=STAGE)
        lineage.update(
            chat_template=template,
            special_tokens={
                "eos": tokenizer.eos_token,
                "pad": tokenizer.pad_token,
                "bos": tokenizer.bos_token,
                "stop": sorted(renderer.stop_tokens or {tokenizer.eos_token}),
            },
            **tracking.run_record(mlrun),
        )
        storage.write_manifest(out, STAGE, lineage, report)
    log.info("data-prep: %s", {k: v for k, v in report.items() if k != "skipped_rows"})
    done = time.perf_counter()
    seconds = {"read_dedupe": prepared_at - started, "render_tokenize": tokenized_at - prepared_at,
               "write_track": done - tokenized_at, "total": done - started}
    log.info("data-prep seconds: %s", json.dumps({k: round(v, 3) for k, v in seconds.items()}))
    return {"status": "succeeded", "metrics": report, "output": str(output)}


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("text", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("assistant_masks", pa.list_(pa.int8())),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + storage.sha256_file(path).encode())
    return digest.hexdigest()


def _plot_lengths(lengths: list[int], limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4c72b0")
    ax.axvline(limit, color="#c44e52", linestyle="--", label=f"max_length={limit}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths of kept rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report_markdown(report: dict[str, Any]) -> str:
    lines = ["# Data report", "", "| | rows |", "|---|---|"]
    for key in ("rows_read", "sft_train", "sft_eval", "preference_train", "preference_eval", "eval_tasks"):
        lines.append(f"| {key} | {report[key]} |")
    lines += ["", "## Rows by format", ""] + [f"- {k}: {v}" for k, v in report["rows_by_format"].items()]
    lines += ["", "## Dropped", ""] + ([f"- {k}: {v}" for k, v in report["dropped"].items()] or ["- none"])
    if report["skipped_rows"]:
        lines += ["", f"## Malformed rows skipped ({report['malformed_skipped']})", ""]
        lines += [f"- {s['where']}: {s['reason']}" for s in report["skipped_rows"]]
    lines += [
        "",
        f"Tokens in the training split: {report['tokens_train']}; longest row {report['token_length_max']}, "
        f"mean {report['token_length_mean']}.",
        "",
        "![token lengths](token_lengths.png)",
    ]
    return "\n".join(lines) + "\n"
