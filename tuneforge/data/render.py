"""Rendering rows with the chat template and tokenizing them with loss masks (1 on the tokens the model learns)."""

from __future__ import annotations

import bisect
import multiprocessing
import sys
from typing import Any

from tuneforge.data.formats import Row
from tuneforge.errors import TemplateError


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

    def specials_in(self, text: str) -> set[str]:
        return {t for t in self.special if t and t in text}

    def answer_scaffold(self) -> str | None:
        """What the template writes around an assistant answer (in a probe conversation), the answer left out; None
        where it does not write the answer at all."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        before = self.render(probe[:1], generation_prompt=True)
        turn = self.render(probe)[len(before) :]
        return turn.replace("Hello", "", 1) if "Hello" in turn else None

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
                raise TemplateError(
                    "the chat template renders a conversation differently from its first turns (it is not "
                    "prefix-stable), so the assistant tokens cannot be located; pick data.chat_template"
                )
            scaffold = upto[len(before) :].replace(message["content"], "")
            stops = self._stops_in.get(scaffold)  # the template's text around an answer: mostly the same one
            if stops is None:
                stops = self.specials_in(scaffold)
                if len(self._stops_in) < 256:
                    self._stops_in[scaffold] = stops
            self.stop_tokens |= stops
            spans.append((len(before), len(upto)))
        return full, spans

    def preference(self, row: Row) -> dict[str, Any]:
        """A pair (prompt, chosen, rejected) or an unpaired row (prompt, completion, label), rendered: the prompt with
        the generation prompt, each answer as the text that follows it."""
        messages = self.with_system(row.messages)
        prompt = self.render(messages, generation_prompt=True)
        answers = {"chosen": row.chosen, "rejected": row.rejected} if row.kind == "preference" else {"completion": row.chosen}
        out: dict[str, Any] = {"prompt": prompt}
        for key, content in answers.items():
            full = self.render([*messages, {"role": "assistant", "content": content}])
            if not full.startswith(prompt):
                raise TemplateError(
                    "the chat template's generation prompt is not a prefix of the rendered answer; "
                    "pick data.chat_template"
                )
            answer = full[len(prompt) :]
            eos = self.tokenizer.eos_token
            # trl appends eos to answers that do not end with it; the turn's trailing newline would double it.
            if eos and answer.rstrip().endswith(eos):
                answer = answer.rstrip()
            out[key] = answer
        if row.kind == "unpaired":
            out["label"] = row.label
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
