"""Compare committed evaluations across runs: accuracy with 95% Wilson intervals per eval set,
parse failures, held-out loss, train throughput, the config keys that differ, and paired
differences with an exact McNemar test on questions both models answered.

An evaluation is named ``RUN`` (the default evaluation, ``runs/<run>/evaluate/``) or
``RUN:NAME`` (a named one, ``runs/<run>/evaluate/<name>/``). Each evaluation holds one or two
models (``base``, ``finetuned``); every (evaluation, model) pair is one *entry* of the table.

Why McNemar and not two independent Wilson intervals: two models scored on the same questions
are paired; whether their accuracies differ is decided only by the questions on which exactly
one of them is right (the discordant pairs). Under "no difference" each discordant question is
equally likely to go either way, so the count b of "A right, B wrong" among n = b + c discordant
questions is Binomial(n, 1/2); the exact two-sided p-value is
``min(1, 2 * sum_{k <= min(b, c)} C(n, k) / 2^n)``. For b=1, c=9: 2 * (1 + 10) / 1024 = 0.02148.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from medreason.errors import InputError
from medreason.evaluation.scoring import wilson_interval
from medreason.report import error_bar_pct, finish_accuracy_plot

MODEL_ORDER = ("base", "finetuned")


# -- statistics -------------------------------------------------------------------------------------
def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c (binomial, p = 1/2).

    Integer arithmetic with math.comb, so it is exact for any n (no float overflow of 2^n).
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0 (got b={b}, c={c})")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    # int / int is correctly rounded in Python even when 2^n is far beyond a float's range.
    return min(1.0, (2 * tail) / (1 << n))


def paired_counts(a: dict[tuple[str, str], bool], b: dict[tuple[str, str], bool]) -> dict[str, int]:
    """Counts over the questions both answered: both right, only a right (b10), only b right (b01)."""
    shared = sorted(set(a) & set(b))
    both = sum(1 for k in shared if a[k] and b[k])
    a_only = sum(1 for k in shared if a[k] and not b[k])
    b_only = sum(1 for k in shared if b[k] and not a[k])
    return {"n": len(shared), "both_correct": both, "a_only": a_only, "b_only": b_only,
            "both_wrong": len(shared) - both - a_only - b_only}


# -- loading ---------------------------------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[str, str | None]:
    """'run' -> ('run', None); 'run:name' -> ('run', 'name'); both parts validated as path segments."""
    from medreason.store import validate_segment

    run, sep, name = ref.partition(":")
    run = validate_segment(run, f"evaluation {ref!r}: run id")
    if not sep:
        return run, None
    return run, validate_segment(name, f"evaluation {ref!r}: evaluation name")


@dataclass
class Evaluation:
    ref: str
    run: str
    name: str | None
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    config: dict[str, Any]
    train_tokens_per_s: float | None = None
    models: list[str] = field(default_factory=list)


def evaluation_rel(store: Any, run: str, name: str | None) -> str:
    rel = store.stage_rel(run, "evaluate")
    return f"{rel}/{name}" if name else rel


def load_evaluation(store: Any, ref: str) -> Evaluation:
    """A committed evaluation's metrics, predictions and resolved config (InputError if absent)."""
    run, name = parse_ref(ref)
    rel = evaluation_rel(store, run, name)
    manifest = store.read_manifest(rel)
    if manifest is None:
        where = f"evaluation {name!r} of run {run!r}" if name else f"run {run!r}"
        raise InputError(f"{ref}: {where} has no committed evaluation at {store.display(rel)}; "
                         "run `medreason evaluate` first (or check the name)")
    try:
        metrics = json.loads(store.read_text(f"{rel}/metrics.json"))
        predictions = [json.loads(line) for line in store.read_text(f"{rel}/predictions.jsonl").splitlines()
                       if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise InputError(f"{ref}: {store.display(rel)} is committed but unreadable: {exc}") from None
    present = list(metrics.get("models") or sorted({r["model"] for r in predictions}))
    models = [m for m in MODEL_ORDER if m in present] + [m for m in present if m not in MODEL_ORDER]
    return Evaluation(ref=ref, run=run, name=name, metrics=metrics, predictions=predictions,
                      config=manifest.get("config") or {}, train_tokens_per_s=train_throughput(store, run),
                      models=models)


def train_throughput(store: Any, run: str) -> float | None:
    """Median tokens/s over the train stage's logged windows (None without a committed train).

    The median, not the mean: the first window holds compilation and warm-up and the last may
    be a short tail, both outliers in a run of a few dozen windows.
    """
    train_rel = store.stage_rel(run, "train")
    manifest = store.read_manifest(train_rel)
    if manifest is None:
        return None
    values: list[float] = []
    if store.exists(f"{train_rel}/metrics.jsonl"):
        for line in store.read_text(f"{train_rel}/metrics.jsonl").splitlines():
            try:
                value = json.loads(line).get("tokens_per_s") if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                values.append(float(value))
    if values:
        return statistics.median(values)
    seen = (manifest.get("metrics") or {}).get("tokens_seen")
    seconds = (manifest.get("timings_s") or {}).get("train")
    return seen / seconds if seen and seconds else None


# -- the comparison ------------------------------------------------------------------------------------
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'learning_rate': 1e-4}} -> {'train.learning_rate': 1e-4}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def config_differences(evals: list[Evaluation]) -> dict[str, list[Any]]:
    """{dotted key: [value per evaluation]} for the keys whose values are not all equal."""
    flat = [flatten(e.config) for e in evals]
    keys = sorted(set().union(*flat)) if flat else []
    diff = {}
    for key in keys:
        values = [f.get(key) for f in flat]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            diff[key] = values
    return diff


def entry_label(ev: Evaluation, model: str) -> str:
    return f"{ev.ref}/{model}"


def accuracy_rows(evals: list[Evaluation]) -> list[dict[str, Any]]:
    """One row per (evaluation, model, set), recomputed from the predictions."""
    rows = []
    for ev in evals:
        losses = ev.metrics.get("heldout_loss") or {}
        for model in ev.models:
            mine = [r for r in ev.predictions if r["model"] == model]
            for set_name in dict.fromkeys(r["set"] for r in mine):
                row = _set_row([r for r in mine if r["set"] == set_name])
                rows.append({
                    "entry": entry_label(ev, model), "run": ev.run, "evaluation": ev.name or "",
                    "model": model, "set": set_name, **row,
                    "heldout_loss": (losses.get(model) or {}).get("loss"),
                    "train_tokens_per_s": ev.train_tokens_per_s,
                })
    return rows


def _set_row(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """n, correct, accuracy with its 95% Wilson interval, and parse failures of one set."""
    n = len(predictions)
    correct = sum(1 for r in predictions if r.get("correct"))
    low, high = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "ci95_low": low, "ci95_high": high,
            "parse_failures": sum(1 for r in predictions if r.get("extracted") is None)}


def paired_rows(evals: list[Evaluation]) -> list[dict[str, Any]]:
    """Paired differences for every two entries scored on shared questions (set + question id).

    Inside one evaluation: base vs fine-tuned. Across evaluations: every pair of entries, so two
    fine-tuned runs are compared directly (and the shared base shows it scored identically).
    """
    entries = []
    for ev in evals:
        for model in ev.models:
            answers: dict[str, dict[tuple[str, str], bool]] = {}
            for r in ev.predictions:
                if r["model"] == model:
                    answers.setdefault(r["set"], {})[(r["set"], str(r["id"]))] = bool(r.get("correct"))
            entries.append((entry_label(ev, model), answers))
    rows = []
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            (la, aa), (lb, ab) = entries[i], entries[j]
            for set_name in [s for s in aa if s in ab]:
                counts = paired_counts(aa[set_name], ab[set_name])
                if not counts["n"]:
                    continue
                n = counts["n"]
                acc_a = (counts["both_correct"] + counts["a_only"]) / n
                acc_b = (counts["both_correct"] + counts["b_only"]) / n
                rows.append({
                    "a": la, "b": lb, "set": set_name, **counts,
                    "accuracy_a": acc_a, "accuracy_b": acc_b, "difference_b_minus_a": acc_b - acc_a,
                    "mcnemar_p": mcnemar_exact(counts["a_only"], counts["b_only"]),
                })
    return rows


def compare(store: Any, refs: list[str]) -> dict[str, Any]:
    """Load the evaluations and compute every table of the comparison."""
    if not refs:
        raise InputError("name at least one evaluation: RUN or RUN:NAME")
    dupes = sorted({r for r in refs if refs.count(r) > 1})
    if dupes:
        raise InputError(f"evaluation named twice: {', '.join(dupes)}")
    evals = [load_evaluation(store, ref) for ref in refs]
    return {
        "evaluations": [e.ref for e in evals],
        "accuracy": accuracy_rows(evals),
        "paired": paired_rows(evals),
        "config_diff": config_differences(evals),
    }


# -- output ------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def render_markdown(result: dict[str, Any], plot: str | None) -> str:
    lines = ["# Comparison of " + ", ".join(f"`{r}`" for r in result["evaluations"]), ""]
    lines += ["Accuracy with its 95% Wilson interval (correct/total); unparsed answers count as wrong "
              "and under parse failures. Train tokens/s: median over the logged windows.", ""]
    lines += ["## Accuracy per eval set", "",
              "| entry | set | n | accuracy [95% CI] | parse failures | held-out loss | train tokens/s |",
              "|---|---|---|---|---|---|---|"]
    for r in result["accuracy"]:
        lines.append(
            f"| {r['entry']} | {r['set']} | {r['n']} | {_pct(r['accuracy'])} [{_pct(r['ci95_low'])}, "
            f"{_pct(r['ci95_high'])}] ({r['correct']}/{r['n']}) | {r['parse_failures']} | "
            f"{_num(r['heldout_loss'], '.4f')} | {_num(r['train_tokens_per_s'], ',.0f')} |")
    lines += ["", "## Paired differences (same questions; exact McNemar test)", ""]
    if result["paired"]:
        lines += ["| A | B | set | shared questions | A only right | B only right | B − A | p (two-sided) |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in result["paired"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['set']} | {p['n']} | {p['a_only']} | {p['b_only']} | "
                         f"{100 * p['difference_b_minus_a']:+.1f} points | {p['mcnemar_p']:.4g} |")
    else:
        lines.append("No two entries share questions.")
    lines += ["", "## Config keys that differ", ""]
    if result["config_diff"]:
        lines += ["| key | " + " | ".join(result["evaluations"]) + " |",
                  "|---|" + "---|" * len(result["evaluations"])]
        for key, values in result["config_diff"].items():
            lines.append(f"| {key} | " + " | ".join(f"`{json.dumps(v)}`" for v in values) + " |")
    else:
        lines.append("The resolved configs are identical.")
    if plot:
        lines += ["", f"![accuracy]({plot})"]
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict[str, Any]], path: str) -> bool:
    """Grouped bars: one group per eval set, one bar per entry, 95% Wilson error bars."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    width = 0.8 / len(entries)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sets) * len(entries) + 2), 4.5), dpi=110)
    for k, entry in enumerate(entries):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(sets):
            r = next((r for r in rows if r["entry"] == entry and r["set"] == s), None)
            if r is None:
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(100 * r["accuracy"])
            err = error_bar_pct(r)
            lo.append(err[0])
            hi.append(err[1])
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=entry)
    finish_accuracy_plot(fig, ax, sets, "Accuracy per eval set", path, legend_size=8)
    plt.close(fig)
    return True


def write_comparison(result: dict[str, Any], out_dir: str) -> list[str]:
    """comparison.md, comparison.csv (accuracy rows), paired.csv, accuracy.png into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, rows in (("comparison.csv", result["accuracy"]), ("paired.csv", result["paired"])):
        with open(os.path.join(out_dir, name), "w", newline="", encoding="utf-8") as fh:
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        written.append(name)
    plot = "accuracy.png" if plot_accuracy(result["accuracy"], os.path.join(out_dir, "accuracy.png")) else None
    if plot:
        written.append(plot)
    with open(os.path.join(out_dir, "comparison.md"), "w", encoding="utf-8") as fh:
        fh.write(render_markdown(result, plot))
    written.insert(0, "comparison.md")
    return written
