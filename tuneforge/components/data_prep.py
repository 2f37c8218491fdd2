"""Stage data-prep: read training files, normalise every known row format to one schema, render with the chat
template, tokenize with loss masks, drop duplicates, empty answers and rows outside the length limits, mix the sources,
split train/eval, find prompts that leak from training into the held-out data, and report what happened, per source.

Inputs: the files named in `data.sources` (and `data.eval_tasks`).
Outputs: the files of tuneforge/data/prepared.py, report.md, token_lengths.png, data_report.json, chat_template.jinja
and manifest.json (chat template, its hash, special tokens, data hash, the data's fingerprint and mix).
A split the run needs (SFT training rows; preference pairs when dpo.enabled) that comes out empty is an error that
says, per source file, how many rows were read and why they were dropped, and which config key would change it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow

from tuneforge import chat_templates, classification, env, gguf_writer, models, plots, storage, tracking
from tuneforge.config import Config, DataSettings
from tuneforge.data import prepared
from tuneforge.data import report as data_report
from tuneforge.data.fingerprint import fingerprint
from tuneforge.data.formats import Dropped, Row, RowError, detect_format, eval_task, ignored_columns, normalised, normalize
from tuneforge.data.readers import read_records
from tuneforge.data.render import Renderer, prepare_sft
from tuneforge.errors import DataError, ExportError, ModelError, TemplateError

log = logging.getLogger(__name__)

STAGE = "data-prep"

# Why rows were dropped, and the config key that changes it.
REMEDIES = {
    "malformed": "fix the rows, or data.on_error: skip",
    "empty_answer": "the assistant's answer is empty: fix the rows",
    "empty_text": "the text is empty: fix the rows",
    "duplicate_exact": "data.dedupe",
    "duplicate_normalized": "data.dedupe",
    "too_long": "data.max_length",
    "too_short": "data.min_length",
    "prompt_too_long": "data.max_length",
    "sampled_out": "data.sources[].weight / max_rows",
    "leakage": "data.leakage",
}


def new_source_report(path: str) -> dict[str, Any]:
    return {"path": path, "format": None, "rows_read": 0, "ignored_columns": [], "dropped": Counter(), "kept": Counter()}


def load_rows(data: DataSettings, sources: dict[str, dict[str, Any]],
              task: str = "generation") -> tuple[list[Row], list[dict[str, str]]]:
    """Every source's rows in the common schema, with what was read and dropped counted in `sources`. For task
    classification every source holds classification rows."""
    rows, skipped = [], []
    for source in data.sources:
        records = read_records(source.path)
        stats = sources.setdefault(source.path, new_source_report(source.path))
        stats["rows_read"] += len(records)
        fmt = source.format
        if task == "classification" and fmt not in ("auto", "classification"):
            raise DataError(f"{source.path}: format {fmt} in data.sources, but task is classification: its rows are text "
                            "(or sentence) and label; set the source's format to auto or classification")
        if task != "classification" and fmt == "classification":
            raise DataError(f"{source.path}: format classification in data.sources needs task: classification")
        if task == "classification":
            fmt = "classification"
        if fmt == "auto":
            first = next((r for _, r in records if isinstance(r, dict)), None)
            if first is None:
                where, record = records[0]
                detail = str(record) if isinstance(record, RowError) else f"got {type(record).__name__}"
                raise DataError(f"{where}: {detail}; cannot detect the format of {source.path}")
            fmt = detect_format(set(first), source.path)
        stats["format"] = fmt
        keys = set().union(*(r for _, r in records if isinstance(r, dict)))
        stats["ignored_columns"] = ignored_columns(keys, fmt) if fmt != "auto" else []
        for where, record in records:
            try:
                row = normalize(record, fmt, where)
            except Dropped as verdict:
                stats["dropped"][verdict.reason] += 1
                continue
            except RowError as exc:
                if data.on_error == "fail":
                    raise DataError(f"{where}: {exc} (format {fmt}); set data.on_error: skip to drop such rows") from None
                skipped.append({"where": where, "reason": str(exc)})
                stats["dropped"]["malformed"] += 1
                continue
            if source.split == "sft" and row.kind != "sft":
                raise DataError(f"{source.path}: split is sft but the rows are {row.kind} rows")
            row.source, row.held_out = source.path, source.split == "eval"
            rows.append(row)
    return rows, skipped


def read_eval_tasks(path: str, renderer: Renderer) -> list[dict[str, Any]]:
    tasks = []
    for where, record in read_records(path):
        try:
            task = eval_task(record)
        except RowError as exc:
            raise DataError(f"{where}: {exc}") from None
        task["messages"] = renderer.with_system(task["messages"])
        tasks.append({**task, "prompt": renderer.render(task["messages"], generation_prompt=True)})
    return tasks


def deduplicate(rows: list[Row], sources: dict[str, dict[str, Any]]) -> list[Row]:
    """Drop exact duplicates and rows equal to an earlier one up to case and whitespace."""
    unique, seen_exact, seen_normalized = [], set(), set()
    for row in rows:
        exact = row.key()
        folded = normalised(exact)
        if exact in seen_exact:
            sources[row.source]["dropped"]["duplicate_exact"] += 1
        elif folded in seen_normalized:
            sources[row.source]["dropped"]["duplicate_normalized"] += 1
        else:
            seen_exact.add(exact)
            seen_normalized.add(folded)
            unique.append(row)
    return unique


def mix(rows: list[Row], data: DataSettings, sources: dict[str, dict[str, Any]]) -> list[Row]:
    """Apply each source's max_rows and weight (seeded sampling, no row repeated); held-out sources are not sampled."""
    rng = random.Random(data.seed)
    by_source: dict[str, list[Row]] = {s.path: [] for s in data.sources}
    for row in rows:
        by_source[row.source].append(row)
    settings = {s.path: s for s in data.sources}
    for path, found in by_source.items():
        if settings[path].max_rows is not None and len(found) > settings[path].max_rows:
            by_source[path] = rng.sample(found, settings[path].max_rows)
    weighted = [p for p in by_source if settings[p].split != "eval" and by_source[p]]
    if any(settings[p].weight is not None for p in weighted):
        weights = {p: settings[p].weight if settings[p].weight is not None else 1.0 for p in weighted}
        # The largest mix with these proportions that no source has to repeat a row for.
        total = min(len(by_source[p]) / (weights[p] / sum(weights.values())) for p in weighted)
        for path in weighted:
            share = round(total * weights[path] / sum(weights.values()))
            by_source[path] = rng.sample(by_source[path], min(share, len(by_source[path])))
    kept = {id(r) for found in by_source.values() for r in found}
    for row in rows:
        if id(row) not in kept:
            sources[row.source]["dropped"]["sampled_out"] += 1
    return [r for r in rows if id(r) in kept]


# Rows over data.max_length are dropped whole. A few are expected; most of a source is a limit set for other data
# (long documents, multi-turn conversations) and would train on what is left without a word.
TOO_LONG_WARN, TOO_LONG_FAIL = 0.1, 0.5


def check_too_long(sources: dict[str, dict[str, Any]], max_length: int) -> None:
    for path, counts in sources.items():
        too_long = counts["dropped"]["too_long"]
        total = counts["rows_read"]
        if not total or too_long / total <= TOO_LONG_WARN:
            continue
        message = (f"{path}: {too_long} of its {total} rows are longer than data.max_length={max_length} tokens and "
                   "are dropped whole")
        if too_long / total > TOO_LONG_FAIL:
            raise DataError(f"{message}: raise data.max_length (within the model's context) or shorten the rows")
        log.warning(message)


def split(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): the rows of split: eval sources are held out, and a seeded share of the others."""
    fixed = [r for r in rows if r["held_out"]]
    rows = [r for r in rows if not r["held_out"]]
    random.Random(seed).shuffle(rows)
    if fraction <= 0 or len(rows) < 2:
        return rows, fixed
    n_eval = max(1, round(len(rows) * fraction))
    return rows[n_eval:], rows[:n_eval] + fixed


def find_leakage(train: list[dict[str, Any]], held_out_prompts: set[str]) -> list[dict[str, Any]]:
    return [r for r in train if r["prompt_key"] and r["prompt_key"] in held_out_prompts]


def empty_split_error(what: str, sources: dict[str, dict[str, Any]], kinds: tuple[str, ...]) -> DataError:
    lines = []
    for stats in sources.values():
        dropped = ", ".join(f"{n} {reason} ({REMEDIES.get(reason, '')})" for reason, n in stats["dropped"].items())
        kept = ", ".join(f"{n} {kind}" for kind, n in stats["kept"].items()) or "none"
        lines.append(f"  {stats['path']}: {stats['rows_read']} rows read ({stats['format']}); kept: {kept}; "
                     f"dropped: {dropped or 'none'}")
    return DataError(f"data-prep: no {what} after reading and filtering ({' or '.join(kinds)} rows):\n" + "\n".join(lines))


def check_turn_end(renderer: Renderer, source: str) -> None:
    """An assistant turn must end in a token the tokenizer holds whole (its EOS or an end-of-turn token): a template
    of another family's markers (llama3's <|eot_id|> on a ChatML tokenizer) is learned as plain text, and the model
    never stops generating. Nothing says so during training; evaluate and serving only see endless answers."""
    try:
        scaffold = renderer.answer_scaffold()
    except Exception:  # a template that cannot render the probe fails on the rows themselves, with their line
        return
    if scaffold is None or renderer.specials_in(scaffold):  # None: no answer rendered, which the rows' check names
        return
    fitting = []
    for name, template in chat_templates.NAMED.items():
        named = Renderer(renderer.tokenizer, template, None)
        if named.specials_in(named.answer_scaffold() or ""):
            fitting.append(name)
    ways = [f"a named template made of its tokens ({', '.join(fitting)})"] if fitting else []
    if renderer.tokenizer.chat_template and renderer.template != renderer.tokenizer.chat_template:
        ways.append("data.chat_template unset (the tokenizer's own template)")
    ways.append("a template of your own that ends each assistant turn with {{ eos_token }}")
    raise TemplateError(
        f"data.chat_template: the template writes {scaffold!r} around an assistant answer, and the tokenizer of "
        f"base_model.source {source!r} has none of it as a token of its own: the model would learn the end of a turn "
        f"as plain text and never stop generating. Use {'; or '.join(ways)}")


def run(config: Config, inputs: dict[str, Path], output: Path) -> dict[str, Any]:
    data = config.data
    started = time.perf_counter()
    found = fingerprint(config)
    expected = os.environ.get(env.DATA_FINGERPRINT)
    if expected and expected != found["sha256"]:
        raise DataError(f"the data changed after this run started (fingerprint {expected[:12]} then, {found['sha256'][:12]} "
                        f"now: {', '.join(o['source'] for o in found['objects'])}); run the pipeline again")
    sources: dict[str, dict[str, Any]] = {}
    rows, skipped = load_rows(data, sources, config.task)
    model_path = models.resolve(config.base_model)
    tokenizer = models.load_tokenizer(model_path, config.base_model)
    model_config = models.load_config(model_path, config.base_model)
    if config.exports_gguf:  # an architecture export cannot write is refused here, not after the training
        try:
            gguf_writer.architecture(model_config.to_dict())
        except ExportError as exc:
            raise ModelError(f"base_model.source {config.base_model.source!r}: {exc}") from None
    # A classifier reads the text as it is: a chat template is kept only where there is one (base models have none).
    needs_template = config.task == "generation" or data.chat_template or tokenizer.chat_template
    template = chat_templates.resolve(data.chat_template, tokenizer) if needs_template else ""
    renderer = Renderer(tokenizer, template, data.system_prompt)
    if config.task == "generation" and (data.eval_tasks or any(r.kind != "sft" or r.text is None for r in rows)):
        check_turn_end(renderer, config.base_model.source)
    eval_tasks = read_eval_tasks(data.eval_tasks, renderer) if data.eval_tasks else []

    rows = mix(deduplicate(rows, sources) if data.dedupe else rows, data, sources)
    sft_rows = [r for r in rows if r.kind == "sft"]
    prepared_at = time.perf_counter()
    kept: dict[str, list[dict[str, Any]]] = {"sft": [], "preference": [], "unpaired": [], "classification": []}
    lengths = []
    labels = _classification_rows([r for r in rows if r.kind == "classification"], config, tokenizer, sources, skipped,
                                  kept["classification"], lengths)
    for row, (text, ids, mask) in zip(sft_rows, prepare_sft(renderer, sft_rows, data.num_proc), strict=True):
        prompt_tokens = mask.index(1) if 1 in mask else len(mask)
        if row.text is None and prompt_tokens >= data.max_length:
            message = (f"{row.where}: the prompt is {prompt_tokens} tokens, longer than data.max_length={data.max_length}: "
                       "no answer token would fit")
            if data.on_error == "fail":
                raise DataError(message + "; raise data.max_length or set data.on_error: skip")
            skipped.append({"where": row.where, "reason": message})
            sources[row.source]["dropped"]["prompt_too_long"] += 1
            continue
        if 1 not in mask:
            raise TemplateError(f"{row.where}: the chat template renders no assistant tokens to learn from")
        reason = "too_long" if len(ids) > data.max_length else "too_short" if len(ids) < data.min_length else None
        if reason:
            sources[row.source]["dropped"][reason] += 1
            continue
        lengths.append(len(ids))
        kept["sft"].append({"messages": row.messages, "text": text, "input_ids": ids, "assistant_masks": mask,
                            "held_out": row.held_out, "prompt_key": row.prompt_key(), "source": row.source})
    for row in (r for r in rows if r.kind in ("preference", "unpaired")):
        rendered = renderer.preference(row)
        prompt_len = len(tokenizer(rendered["prompt"], add_special_tokens=False)["input_ids"])
        answers = [k for k in ("chosen", "rejected", "completion") if k in rendered]
        answer_len = max(len(tokenizer(rendered[k], add_special_tokens=False)["input_ids"]) for k in answers)
        if prompt_len + answer_len > data.max_length:
            sources[row.source]["dropped"]["too_long"] += 1
            continue
        lengths.append(prompt_len + answer_len)
        kept[row.kind].append({**rendered, "held_out": row.held_out, "prompt_key": row.prompt_key(), "source": row.source})
    for kind, found_rows in kept.items():
        for r in found_rows:
            sources[r["source"]]["kept"][kind] += 1
    splits = {kind: split(found_rows, data.eval_fraction, data.seed) for kind, found_rows in kept.items()}
    held_out_prompts = {r["prompt_key"] for _, held in splits.values() for r in held if r["prompt_key"]}
    held_out_prompts |= {normalised(" ".join(m["content"] for m in t["messages"] if m["role"] == "user")) for t in eval_tasks}
    leaked = {kind: find_leakage(train, held_out_prompts) for kind, (train, _) in splits.items()}
    leak_count = sum(map(len, leaked.values()))
    if leak_count:
        example = next(r for found_rows in leaked.values() for r in found_rows)
        message = (f"{leak_count} training rows have a prompt that is also in the held-out split or the eval tasks "
                   f"(first from {example['source']}); data.leakage is {data.leakage}")
        if data.leakage == "fail":
            raise DataError(message + "; remove them from the data, or set data.leakage: drop (or warn)")
        log.warning(message)
        if data.leakage == "drop":
            for kind, (train, held) in splits.items():
                leaking = {id(r) for r in leaked[kind]}
                for r in leaked[kind]:
                    sources[r["source"]]["dropped"]["leakage"] += 1
                splits[kind] = ([r for r in train if id(r) not in leaking], held)

    if config.task == "classification":
        _check_classification(splits["classification"], labels, sources)
    elif (config.sft.enabled or config.grpo.enabled) and not splits["sft"][0]:
        raise empty_split_error("SFT training rows", sources, ("alpaca", "messages", "sharegpt", "prompt/completion", "text"))
    if config.dpo.enabled and config.dpo.method == "kto":
        if not splits["preference"][0] and not splits["unpaired"][0]:
            raise empty_split_error("rows to train KTO on (dpo.method is kto)", sources, ("preference", "unpaired"))
    elif config.dpo.enabled and not splits["preference"][0]:
        unpaired = " (unpaired rows train dpo.method: kto only)" if splits["unpaired"][0] else ""
        raise empty_split_error(f"preference pairs to train {config.dpo.method.upper()} on (dpo.enabled is true)"
                                + unpaired, sources, ("preference",))
    for stats in sources.values():
        if stats["rows_read"] and not sum(stats["kept"].values()):
            reasons = ", ".join(f"{n} {reason} ({REMEDIES.get(reason, '')})" for reason, n in stats["dropped"].items())
            raise DataError(f"{stats['path']}: every one of its {stats['rows_read']} rows was dropped: {reasons}")
    check_too_long(sources, data.max_length)
    context = models.context_length(model_config)
    if context and lengths and max(lengths) > context:
        # Positions past the context still compute (rotary embeddings do not stop), so training there fails quietly.
        raise DataError(f"the longest row is {max(lengths)} tokens ({sum(n > context for n in lengths)} of "
                        f"{len(lengths)} over), longer than base_model.source {config.base_model.source!r} was trained "
                        f"for ({context} tokens, its max_position_embeddings): set data.max_length: {context} (longer "
                        "rows are then dropped), or use a model with a longer context")
    if config.sft.loss_on == "assistant" and kept["sft"] and all(all(r["assistant_masks"]) for r in kept["sft"]):
        log.warning("every SFT row is raw text: loss_on=assistant has no prompt to mask")

    tokenized_at = time.perf_counter()
    (sft_train, sft_eval), (pref_train, pref_eval), (unpaired_train, unpaired_eval), (class_train, class_eval) = (
        [[_bare(r) for r in part] for part in splits[kind]] for kind in ("sft", "preference", "unpaired", "classification"))
    report = {
        "rows_read": sum(s["rows_read"] for s in sources.values()),
        "rows_by_format": dict(sum((Counter({s["format"]: sum(s["kept"].values())}) for s in sources.values()), Counter())),
        "malformed_skipped": len(skipped),
        "skipped_rows": skipped[:100],
        "dropped": dict(sum((s["dropped"] for s in sources.values()), Counter())),
        "sources": [{**s, "dropped": dict(s["dropped"]), "kept": dict(s["kept"])} for s in sources.values()],
        "sft_train": len(sft_train),
        "sft_eval": len(sft_eval),
        "preference_train": len(pref_train),
        "preference_eval": len(pref_eval),
        "unpaired_train": len(unpaired_train),
        "unpaired_eval": len(unpaired_eval),
        "classification_train": len(class_train),
        "classification_eval": len(class_eval),
        "eval_tasks": len(eval_tasks),
        "leakage_rows": leak_count,
        "leakage_action": data.leakage,
        "tokens_train": sum(len(r["input_ids"]) for r in sft_train + class_train),
        "token_length_max": max(lengths),
        "token_length_mean": round(sum(lengths) / len(lengths), 1),
    }
    if labels:
        report["labels"] = {"train": _label_counts(class_train, labels), "eval": _label_counts(class_eval, labels)}
        report["conflicting_labels"] = _conflicting_labels(kept["classification"], labels)
    lineage = tracking.new_lineage(config, inputs)
    # What the pipeline's first task measured decides the cache; a stage run alone has only its own measure.
    model = models.fingerprint(config.base_model)
    lineage.update(chat_template_sha256=chat_templates.template_hash(template), data_fingerprint=found["sha256"],
                   base_model_fingerprint=os.environ.get(env.BASE_MODEL_FINGERPRINT) or model["sha256"],
                   **({"base_model_commit": model["identity"]["commit"]} if model["identity"].get("commit") else {}),
                   data_objects=found["objects"], data_rows={k: report[k] for k in data_report.SPLITS},
                   data_mix={s["path"]: dict(s["kept"]) for s in report["sources"]},
                   **({"labels": labels} if labels else {}))
    with tracking.stage_run(config, STAGE, lineage) as tracker, storage.staged_output(output) as out:
        prepared.write_sft(out / "sft_train.parquet", sft_train)
        prepared.write_sft(out / "sft_eval.parquet", sft_eval)
        prepared.write_classification(out / "classification_train.parquet", class_train)
        prepared.write_classification(out / "classification_eval.parquet", class_eval)
        for name, part in (("preference_train", pref_train), ("preference_eval", pref_eval),
                           ("unpaired_train", unpaired_train), ("unpaired_eval", unpaired_eval),
                           ("eval_tasks", eval_tasks)):
            prepared.write_jsonl(out / f"{name}.jsonl", part)
        lineage["data_sha256"] = _hash_files(out)
        tracker.record("the data hash tag", tracking.set_lineage, {"data_sha256": lineage["data_sha256"]})
        plots.token_lengths(lengths, data.max_length, out / "token_lengths.png")
        (out / "data_report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(data_report.markdown(report))
        (out / "chat_template.jinja").write_text(template)
        tracker.record("the data report metrics", mlflow.log_metrics,
                       {k: v for k, v in report.items() if isinstance(v, (int, float))})
        for name in ("report.md", "data_report.json", "token_lengths.png", "chat_template.jinja"):
            tracker.record(f"artifact {STAGE}/{name}", mlflow.log_artifact, str(out / name), artifact_path=STAGE)
        lineage.update(
            chat_template=template,
            special_tokens={
                "eos": tokenizer.eos_token,
                "pad": tokenizer.pad_token,
                "bos": tokenizer.bos_token,
                "stop": sorted(renderer.stop_tokens or {tokenizer.eos_token}),
            },
            **tracker.run_record(),
        )
        storage.write_manifest(out, STAGE, lineage, report)
    log.info("data-prep: %s", {k: v for k, v in report.items() if k not in ("skipped_rows", "sources")})
    done = time.perf_counter()
    seconds = {"read_dedupe": prepared_at - started, "render_tokenize": tokenized_at - prepared_at,
               "write_track": done - tokenized_at, "total": done - started}
    log.info("data-prep seconds: %s", json.dumps({k: round(v, 3) for k, v in seconds.items()}))
    return tracker.result(report, output)


def _classification_rows(rows: list[Row], config: Config, tokenizer, sources: dict[str, dict[str, Any]],
                         skipped: list[dict[str, str]], kept: list[dict[str, Any]], lengths: list[int]) -> list[str]:
    """Tokenize classification rows into `kept` (text, input_ids, label index), dropping those outside the length
    limits; returns the label names (none without such rows)."""
    if not rows:
        return []
    data, configured = config.data, config.classification.labels
    names = classification.label_names([r.label for r in rows], configured)
    encoded = tokenizer([r.text for r in rows])["input_ids"]
    for row, ids in zip(rows, encoded, strict=True):
        try:
            label = classification.label_index(row.label, names, configured is not None)
        except RowError as exc:
            if data.on_error == "fail":
                raise DataError(f"{row.where}: {exc}; or set data.on_error: skip to drop such rows") from None
            skipped.append({"where": row.where, "reason": str(exc)})
            sources[row.source]["dropped"]["malformed"] += 1
            continue
        reason = "too_long" if len(ids) > data.max_length else "too_short" if len(ids) < data.min_length else None
        if reason:
            sources[row.source]["dropped"][reason] += 1
            continue
        lengths.append(len(ids))
        kept.append({"text": row.text, "input_ids": ids, "label": label, "held_out": row.held_out,
                     "prompt_key": row.prompt_key(), "source": row.source})
    return names


def _check_classification(split_rows: tuple[list, list], labels: list[str], sources: dict[str, dict[str, Any]]) -> None:
    train, held_out = split_rows
    if not train:
        raise empty_split_error("classification training rows (task is classification)", sources, ("classification",))
    trained = {r["label"] for r in train}
    if len(trained) < 2:
        raise DataError(f"data-prep: every classification training row has the label {labels[train[0]['label']]!r}: a "
                        "classifier needs at least two labels to learn from")
    unseen = [labels[i] for i in range(len(labels)) if i not in trained]
    if unseen:
        log.warning("labels with no training row (the head can only learn them from nothing): %s", ", ".join(unseen))
    if not held_out:
        log.warning("no held-out classification rows (data.eval_fraction is 0 and no split: eval source): evaluate will "
                    "have nothing to score")


def _conflicting_labels(rows: list[dict[str, Any]], labels: list[str]) -> int:
    """Texts (case and whitespace aside) given more than one label: counted, and the first named, since no classifier
    can be right on both."""
    found: dict[str, set[int]] = {}
    for row in rows:
        found.setdefault(row["prompt_key"], set()).add(row["label"])
    conflicting = [(text, seen) for text, seen in found.items() if len(seen) > 1]
    if conflicting:
        text, seen = conflicting[0]
        log.warning("%d texts have more than one label (first: %r labelled %s); fix the rows, or they cap accuracy",
                    len(conflicting), text[:80], ", ".join(labels[i] for i in sorted(seen)))
    return len(conflicting)


def _label_counts(rows: list[dict[str, Any]], labels: list[str]) -> dict[str, int]:
    found = Counter(r["label"] for r in rows)
    return {name: found[i] for i, name in enumerate(labels)}


def _bare(row: dict[str, Any]) -> dict[str, Any]:
    """A row as written: without what data-prep tracked it by."""
    return {k: v for k, v in row.items() if k not in ("held_out", "prompt_key", "source")}


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + storage.sha256_file(path).encode())
    return digest.hexdigest()
