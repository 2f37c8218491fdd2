"""Row formats: detecting them from a row's keys and normalising every known one to one schema (a Row).

The shapes of the public datasets people train on are read without a `format:` key. Where a row carries more than one
shape, the intent decides by precedence: `chosen` + `rejected` is a preference pair whatever else the row holds
(UltraFeedback-binarized also carries `messages`, scores and ids), `prompt` + `completion` + `label` is an unpaired
(KTO) row, then messages, ShareGPT conversations, alpaca, prompt/completion and raw text. The columns no format reads
are ignored and listed in the data report. Only rows with both `messages` and `conversations` are truly ambiguous.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import DataError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# format -> the keys it reads. The order is the precedence of detection.
FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected", "prompt", "question", "input", "instruction", "system"),
    "unpaired": ("prompt", "completion", "label", "system"),
    "messages": ("messages",),
    "sharegpt": ("conversations", "system", "system_prompt"),
    "alpaca": ("instruction", "input", "context", "output", "response", "system"),
    "prompt_completion": ("prompt", "completion", "system"),
    "text": ("text",),
    # task: classification only (never detected for generation: a text row with a label column is still a text row).
    "classification": ("text", "sentence", "label"),
}
SHAPES = {
    "preference": "chosen, rejected[, prompt | question | input] (strings, message lists, or Human:/Assistant: transcripts)",
    "unpaired": "prompt, completion, label (KTO)",
    "messages": "messages: [{role, content}]",
    "sharegpt": "conversations: [{from, value}]",
    "alpaca": "instruction, output | response[, input | context]",
    "prompt_completion": "prompt, completion",
    "text": "text",
    "classification": "text | sentence, label (a string or an integer; task: classification)",
}


class RowError(ValueError):
    """One row that cannot be used; the caller adds where it is and decides whether it stops data-prep."""


class Dropped(Exception):  # noqa: N818 (a verdict, not an error: the row is well formed and has nothing to learn)
    """A well-formed row with nothing to learn from; `reason` is counted in the data report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Row:
    """A row in the common schema: `messages` or `text` for SFT; `messages` + chosen/rejected for a preference pair;
    `messages` + chosen (the completion) + label for an unpaired (KTO) row."""

    where: str
    kind: str  # "sft", "preference", "unpaired" or "classification"
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    label: bool | str | int | None = None  # unpaired: good or bad; classification: the class, as the row gives it
    source: str = ""
    held_out: bool = False  # from a source with split: eval

    def key(self) -> str:
        return json.dumps([self.messages, self.text, self.chosen, self.rejected, self.label], sort_keys=True)

    def prompt_key(self) -> str | None:
        """The row's prompt, normalised (case, whitespace), to find the same prompt in training and held-out data."""
        if self.kind == "classification":
            return normalised(self.text)
        if not self.messages:
            return None
        turns = self.messages[:-1] if self.kind == "sft" and self.messages[-1]["role"] == "assistant" else self.messages
        return normalised(" ".join(m["content"] for m in turns if m["role"] == "user"))


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def detect_format(keys: set[str], where: str) -> str:
    if {"messages", "conversations"} <= keys:
        raise DataError(f"{where}: ambiguous row format; keys found: {', '.join(sorted(keys))} hold both messages and "
                        "conversations. Set format in data.sources to pick one")
    for fmt, matches in (
        ("preference", {"chosen", "rejected"} <= keys),
        ("unpaired", {"prompt", "completion", "label"} <= keys),
        ("messages", "messages" in keys),
        ("sharegpt", "conversations" in keys),
        ("alpaca", "instruction" in keys and bool(keys & {"output", "response"})),
        ("prompt_completion", {"prompt", "completion"} <= keys),
        ("text", "text" in keys),
    ):
        if matches:
            return fmt
    considered = "; ".join(f"{fmt} ({shape})" for fmt, shape in SHAPES.items())
    raise DataError(f"{where}: unknown row format; keys found: {', '.join(sorted(keys)) or 'none'}. Formats considered: "
                    f"{considered}. Set format in data.sources")


def ignored_columns(keys: set[str], fmt: str) -> list[str]:
    return sorted(keys - set(FORMATS[fmt]))


def _string(record: dict, key: str, empty: str | None = None) -> str:
    """A string field; an empty one is malformed, or, with `empty`, a row dropped for that reason."""
    if key not in record or record[key] is None:
        raise RowError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        if empty:
            raise Dropped(empty)
        raise RowError(f"field {key!r} is empty")
    return value


def _text(content: Any, where: str) -> Any:
    """OpenAI-style content parts ([{"type": "text", "text": ...}]) become plain text; other values pass through."""
    if isinstance(content, list):
        kinds = {p.get("type") for p in content if isinstance(p, dict)}
        if kinds - {"text"}:
            raise RowError(f"{where}: content parts of type {', '.join(sorted(map(str, kinds - {'text'})))} are not "
                           "supported (text models only); drop these rows (data.on_error: skip)")
        if content and all(isinstance(p, dict) for p in content):
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
        if turn.get("tool_calls") or any(turn.get(k) in ("tool", "function") for k in ("role", "from")
                                         if isinstance(turn.get(k), str)):
            raise RowError(f"{key}[{i}]: tool calls and tool results are not supported; drop these rows "
                           "(data.on_error: skip) or write the calls into the text")
        # ShareGPT exports use from/value, some use role/content inside "conversations"; accept both.
        role_key, content_key = ("from", "value") if sharegpt and "from" in turn else ("role", "content")
        role = turn.get(role_key)
        content = _text(turn.get(content_key), f"{key}[{i}].{content_key}")
        names = SHAREGPT_ROLES if sharegpt else ROLES
        if not isinstance(role, str) or role not in names:
            raise RowError(f"{key}[{i}].{role_key}: {role!r} is not one of {', '.join(names)}")
        if not isinstance(content, str):
            raise RowError(f"{key}[{i}].{content_key} must be a string, got {type(content).__name__}")
        if names[role] == "assistant" and turn.get("weight") == 0:
            raise RowError(f"{key}[{i}].weight is 0, an answer not to train on, and every assistant turn of a "
                           "conversation is trained on; drop these rows (data.on_error: skip) or the turns after it")
        turns.append({"role": names[role], "content": content})
    return turns


def _with_system(messages: list[dict[str, str]], record: dict, *keys: str) -> list[dict[str, str]]:
    for key in keys:
        system = record.get(key)
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
            return [{"role": "system", "content": system}, *messages]
    return messages


def _learnable(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise RowError(f"no assistant turn in {key}: nothing to learn from this row")
    if not any(a.strip() for a in answers):
        raise Dropped("empty_answer")
    return messages


def normalize(record: Any, fmt: str, where: str) -> Row:
    """The row in the common schema. RowError: malformed; Dropped: well formed with nothing to learn."""
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
        answer = _string(record, "response" if "response" in record and "output" not in record else "output",
                         empty="empty_answer")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return Row(where, "sft", messages=_with_system(messages, record, "system"))
    if fmt == "messages":
        return Row(where, "sft", messages=_learnable(_messages(record.get("messages"), "messages"), "messages"))
    if fmt == "sharegpt":
        messages = _learnable(_messages(record.get("conversations"), "conversations", sharegpt=True), "conversations")
        return Row(where, "sft", messages=_with_system(messages, record, "system", "system_prompt"))
    if fmt == "prompt_completion":
        messages = [{"role": "user", "content": _string(record, "prompt")},
                    {"role": "assistant", "content": _string(record, "completion", empty="empty_answer")}]
        return Row(where, "sft", messages=_with_system(messages, record, "system"))
    if fmt == "text":
        return Row(where, "sft", text=_string(record, "text", empty="empty_text"))
    if fmt == "preference":
        return _preference(record, where)
    if fmt == "unpaired":
        return _unpaired(record, where)
    if fmt == "classification":
        return _classification(record, where)
    raise RowError(f"unknown format {fmt!r}")


# Anthropic HH-RLHF writes each side as one transcript: "\n\nHuman: ...\n\nAssistant: ...".
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _transcript(text: str) -> list[dict[str, str]] | None:
    if not text.startswith("\n\nHuman: "):
        return None
    parts = TRANSCRIPT_TURN.split(text)[1:]
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[::2], parts[1::2], strict=True)]


def _side(record: dict, key: str) -> list[dict[str, str]] | str:
    """One side of a pair: a plain answer, or turns (a message list or a transcript) ending with the answer."""
    value = record.get(key)
    if value is None:
        raise RowError(f"missing field {key!r}")
    if isinstance(value, str):
        turns = _transcript(value)
        if turns is None:
            if not value.strip():
                raise Dropped("empty_answer")
            return value
    else:
        turns = _messages(value, key)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"{key}: the last turn must be the assistant's answer")
    if not turns[-1]["content"].strip():
        raise Dropped("empty_answer")
    return turns


def _prompt(record: dict) -> list[dict[str, str]] | None:
    for key in ("prompt", "question", "input", "instruction"):  # orca_dpo_pairs says question, argilla's orca input
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if not value.strip():
                raise RowError(f"field {key!r} is empty")
            return [{"role": "user", "content": value}]
        return _messages(value, key)
    return None


def _preference(record: dict, where: str) -> Row:
    chosen, rejected = _side(record, "chosen"), _side(record, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowError("chosen and rejected must both be answers or both be conversations")
    if isinstance(chosen, list):
        # The turns the two sides share are the prompt (UltraFeedback-binarized, its trl-lib variant, HH-RLHF).
        if chosen[:-1] != rejected[:-1]:
            raise RowError("chosen and rejected differ before their last turn: the turns they share are the prompt")
        messages = chosen[:-1] or _prompt(record)
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    else:
        messages = _prompt(record)
    if not messages:
        raise RowError("no prompt: missing field 'prompt' (or question / input), and chosen holds no prompt turns")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical: no preference to learn")
    return Row(where, "preference", messages=_with_system(messages, record, "system"), chosen=chosen, rejected=rejected)


# bool and 0/1 (equal as dict keys), and the strings a CSV gives.
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}


def _unpaired(record: dict, where: str) -> Row:
    given = record.get("label")
    label = LABELS.get(given.lower() if isinstance(given, str) else given) if isinstance(given, (bool, int, str)) else None
    if label is None:
        raise RowError(f"field 'label' must be true or false, got {given!r}")
    prompt = _prompt(record)
    if not prompt:
        raise RowError("missing field 'prompt'")
    completion = _side(record, "completion")
    if isinstance(completion, list):
        prompt, completion = prompt + completion[:-1], completion[-1]["content"]
    return Row(where, "unpaired", messages=_with_system(prompt, record, "system"), chosen=completion, label=label)


def _classification(record: dict, where: str) -> Row:
    text = _string(record, "sentence" if "sentence" in record and "text" not in record else "text", empty="empty_text")
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, str) and not label.strip()):
        raise RowError(f"field 'label' must be a class name or an integer, got {label!r}")
    return Row(where, "classification", text=text, label=label.strip() if isinstance(label, str) else label)


TASK_METRICS = ("exact_match", "contains", "rouge_l")


def eval_task(record: Any) -> dict[str, Any]:
    """A generation task for evaluate: the prompt (or messages), the expected answer and the metric that decides it."""
    if isinstance(record, RowError):
        raise record
    if not isinstance(record, dict):
        raise RowError(f"expected an object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
    else:
        messages = [{"role": "user", "content": _string(record, "prompt")}]
    metric = record.get("metric", "exact_match")
    if metric not in TASK_METRICS:
        raise RowError(f"metric {metric!r} is not one of {', '.join(TASK_METRICS)}")
    return {"messages": messages, "expected": _string(record, "expected"), "metric": metric}
