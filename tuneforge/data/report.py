"""The data report: what data-prep read, kept, dropped and why, per source, as Markdown beside data_report.json."""

from __future__ import annotations

from typing import Any

SPLITS = ("rows_read", "sft_train", "sft_eval", "preference_train", "preference_eval", "unpaired_train", "unpaired_eval",
          "classification_train", "classification_eval", "eval_tasks")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Data report", "", "| | rows |", "|---|---|"]
    lines += [f"| {key} | {report[key]} |" for key in SPLITS]
    if "labels" in report:
        lines += ["", "## Labels", "", "| label | train | held out |", "|---|---|---|"]
        lines += [f"| {name} | {n} | {report['labels']['eval'][name]} |" for name, n in report["labels"]["train"].items()]
    lines += ["", "## Sources", "", "| file | format | read | kept | dropped | columns ignored |", "|---|---|---|---|---|---|"]
    for source in report["sources"]:
        kept = ", ".join(f"{kind} {n}" for kind, n in source["kept"].items()) or "none"
        dropped = ", ".join(f"{reason} {n}" for reason, n in source["dropped"].items()) or "none"
        lines.append(f"| {source['path']} | {source['format']} | {source['rows_read']} | {kept} | {dropped} | "
                     f"{', '.join(source['ignored_columns']) or '-'} |")
    lines += ["", f"Training rows whose prompt is also in the held-out data: {report['leakage_rows']} "
              f"(data.leakage: {report['leakage_action']})."]
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
