"""Scoring: one prediction row per answer, accuracy with Wilson intervals, headline numbers.

Answers are pulled out of the generations by medreason.extraction (its docstring gives the rule
order); an unparsed answer counts as wrong and is also counted as a parse failure. Rows scored
by likelihood (medreason.loglik) carry ``correct_norm`` too, summarized as ``accuracy_norm``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from medreason.extraction import extract_answer

# z for a two-sided 95% interval: the 97.5th percentile of the standard normal.
Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927).

    Unlike the normal approximation p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not
    degenerate at 0 or n successes: for 0/10 it gives (0, 0.278), not (0, 0).
    """
    if total <= 0:
        return (0.0, 0.0)
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} must be between 0 and total={total}")
    p = correct / total
    z2 = z * z
    denom = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, its 95% Wilson interval and parse failures over prediction rows."""
    n = len(rows)
    correct = sum(1 for r in rows if r["correct"])
    failures = sum(1 for r in rows if r["extracted"] is None)
    low, high = wilson_interval(correct, n)
    out = {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": low,
        "ci95_high": high,
        "parse_failures": failures,
        "parse_failure_rate": failures / n if n else 0.0,
    }
    if any("correct_norm" in r for r in rows):
        # Likelihood scoring: lm-eval's acc_norm (log-likelihood per character of the option).
        correct_norm = sum(1 for r in rows if r.get("correct_norm"))
        low_n, high_n = wilson_interval(correct_norm, n)
        out.update({"correct_norm": correct_norm, "accuracy_norm": correct_norm / n if n else 0.0,
                    "ci95_low_norm": low_n, "ci95_high_norm": high_n})
    return out


def summarize(predictions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{set: {model: summary + by_source: {dataset_name: summary}}} over all prediction rows."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in predictions:
        groups[(row["set"], row["model"])].append(row)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (set_name, model), rows in sorted(groups.items()):
        summary = summarize_rows(rows)
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_source[row["source"]].append(row)
        summary["by_source"] = {src: summarize_rows(rs) for src, rs in sorted(by_source.items())}
        out.setdefault(set_name, {})[model] = summary
    return out


def score(record: dict[str, Any], generated: str, model: str, set_name: str, prompt: str) -> dict[str, Any]:
    """One prediction row: the extracted letter against the gold one."""
    letter, method = extract_answer(generated, record["options_map"])
    gold = record["answer_letter"]
    return {
        "model": model,
        "set": set_name,
        "id": record["uid"],
        "source": record.get("dataset_name", set_name),
        "prompt": prompt,
        "generated": generated,
        "extracted": letter,
        "gold": gold,
        "correct": letter is not None and letter == gold,
        "parse_method": method,
    }


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the manifest: <set>_accuracy_<model> (and _accuracy_norm_ when scored by
    likelihood), parse failures, skipped bad rows, held-out loss."""
    out: dict[str, float] = {}
    for set_name, per_model in metrics["sets"].items():
        for model, summary in per_model.items():
            out[f"{set_name}_accuracy_{model}"] = round(summary["accuracy"], 4)
            if "accuracy_norm" in summary:
                out[f"{set_name}_accuracy_norm_{model}"] = round(summary["accuracy_norm"], 4)
            out[f"{set_name}_parse_failure_rate_{model}"] = round(summary["parse_failure_rate"], 4)
            out[f"{set_name}_n"] = summary["n"]
    for set_name, skipped in (metrics.get("bad_rows") or {}).items():
        out[f"{set_name}_bad_rows_skipped"] = skipped["skipped"]
    for model, loss in metrics.get("heldout_loss", {}).items():
        out[f"heldout_loss_{model}"] = round(loss["loss"], 4)
        out[f"heldout_perplexity_{model}"] = round(loss["perplexity"], 3)
    return out
