"""The evaluate stage's files: predictions.jsonl, metrics.json, report.md and PNG plots.

Plots use matplotlib's Agg backend (no display needed): ``loss_curves.png`` (train and eval
loss per step from the train stage's metrics.jsonl) and ``accuracy.png`` (accuracy per eval set,
base vs fine-tuned, with 95% Wilson intervals as error bars).
"""

from __future__ import annotations

import math
import os
from typing import Any

from medreason import jsonio

MODEL_ORDER = ("base", "finetuned")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _acc_cell(s: dict[str, Any] | None) -> str:
    if not s:
        return "–"
    return f"{_pct(s['accuracy'])} [{_pct(s['ci95_low'])}, {_pct(s['ci95_high'])}] ({s['correct']}/{s['n']})"


def _models(metrics: dict[str, Any]) -> list[str]:
    present = list(metrics.get("models") or [])
    return [m for m in MODEL_ORDER if m in present] + [m for m in present if m not in MODEL_ORDER]


def _loglik(metrics: dict[str, Any]) -> bool:
    return metrics.get("scoring") == "loglikelihood"


def _header_lines(metrics: dict[str, Any], models: list[str]) -> list[str]:
    info = metrics.get("model_info", {})
    name = metrics.get("evaluation")
    title = f"# Evaluation `{name}` of run `{metrics.get('run_id', '?')}`" if name else \
        f"# Evaluation of run `{metrics.get('run_id', '?')}`"
    if _loglik(metrics):
        what = "each option's text" if metrics.get("choices") == "text" else "each option's letter"
        how = [
            f"- scoring: log-likelihood of {what} after lm-evaluation-harness's medqa prompt "
            "(\"Question: ...\\nA. ...\\nAnswer:\"), no generation; **acc** picks the highest "
            "log-likelihood, **acc_norm** the highest per character of the option, as lm-eval does",
            "- accuracy with its 95% Wilson interval and (correct/total)",
        ]
    else:
        how = [
            f"- prompt template: `{metrics.get('template')}`; greedy decoding, at most "
            f"{metrics.get('max_new_tokens')} new tokens",
            "- accuracy with its 95% Wilson interval and (correct/total); an answer that cannot "
            "be parsed counts as wrong and is also counted under parse failures",
        ]
    return [title, "", f"- checkpoint: `{metrics.get('checkpoint')}`; models: "
            + ", ".join(f"**{m}** ({info.get(m, {}).get('source', m)})" for m in models), *how, ""]


def _norm_cell(s: dict[str, Any] | None) -> str:
    if not s or "accuracy_norm" not in s:
        return "–"
    return (f"{_pct(s['accuracy_norm'])} [{_pct(s['ci95_low_norm'])}, {_pct(s['ci95_high_norm'])}] "
            f"({s['correct_norm']}/{s['n']})")


def _second_columns(metrics: dict[str, Any], models: list[str],
                    per_model: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(headers, cells) after the accuracy columns: acc_norm when scored by likelihood (which
    never fails to parse), else parse failures."""
    if _loglik(metrics):
        return [f"{m} acc_norm" for m in models], [_norm_cell(per_model.get(m)) for m in models]
    return [f"{m} parse failures" for m in models], [
        f"{per_model[m]['parse_failures']} ({_pct(per_model[m]['parse_failure_rate'])})" if m in per_model else "–"
        for m in models]


def _per_set_lines(metrics: dict[str, Any], models: list[str]) -> list[str]:
    """The accuracy table per eval set, then the fine-tuned - base difference per set."""
    lines = ["## Accuracy per eval set", ""]
    acc = "acc" if _loglik(metrics) else "accuracy"
    second, _ = _second_columns(metrics, models, {})
    header = "| set | n | " + " | ".join(f"{m} {acc}" for m in models) + " | " + " | ".join(second) + " |"
    lines += [header, "|" + "---|" * (2 + 2 * len(models))]
    for set_name, per_model in metrics.get("sets", {}).items():
        n = next(iter(per_model.values()))["n"]
        cells = [_acc_cell(per_model.get(m)) for m in models]
        _, more = _second_columns(metrics, models, per_model)
        lines.append(f"| {set_name} | {n} | " + " | ".join(cells) + " | " + " | ".join(more) + " |")
    if len(models) == 2:
        lines.append("")
        for set_name, per_model in metrics.get("sets", {}).items():
            if all(m in per_model for m in models):
                delta = per_model[models[1]]["accuracy"] - per_model[models[0]]["accuracy"]
                lines.append(f"- {set_name}: {models[1]} − {models[0]} = {100 * delta:+.1f} points")
    return lines


def _per_source_lines(metrics: dict[str, Any], models: list[str]) -> list[str]:
    lines = ["", "## Accuracy per source dataset", ""]
    lines += ["| set | source | n | " + " | ".join(models) + " |", "|" + "---|" * (3 + len(models))]
    for set_name, per_model in metrics.get("sets", {}).items():
        sources = sorted({s for m in per_model.values() for s in m.get("by_source", {})})
        for src in sources:
            row = [per_model.get(m, {}).get("by_source", {}).get(src) for m in models]
            n = next(r["n"] for r in row if r)
            lines.append(f"| {set_name} | {src} | {n} | " + " | ".join(_acc_cell(r) for r in row) + " |")
    return lines


def _loss_lines(metrics: dict[str, Any], models: list[str]) -> list[str]:
    losses = metrics.get("heldout_loss") or {}
    if not losses:
        return []
    lines = ["", "## Held-out loss (teacher-forced, prompt tokens masked as in training)", ""]
    lines += ["| model | loss | perplexity | tokens |", "|---|---|---|---|"]
    for m in models:
        if m in losses:
            lo = losses[m]
            lines.append(f"| {m} | {lo['loss']:.4f} | {lo['perplexity']:.2f} | {lo['tokens']} |")
    return lines


def _bad_row_lines(metrics: dict[str, Any]) -> list[str]:
    """Rows of benchmarks with ``bad_rows: skip`` that were left out, counted by reason."""
    bad = {k: v for k, v in (metrics.get("bad_rows") or {}).items() if v.get("skipped")}
    if not bad:
        return []
    lines = ["", "## Skipped rows (bad_rows: skip)", "", "| set | skipped | reason | rows |", "|---|---|---|---|"]
    for set_name, summary in bad.items():
        for reason, count in summary["by_reason"].items():
            rows = [str(r["row"]) for r in summary["rows"] if r["reason"] == reason]
            shown = ", ".join(rows[:20]) + (f", ... ({len(rows) - 20} more)" if len(rows) > 20 else "")
            lines.append(f"| {set_name} | {count} | {reason} | {shown} |")
    lines.append("")
    lines.append("Each skipped row's message is in metrics.json under bad_rows.")
    return lines


def render_report(metrics: dict[str, Any], plots: list[str]) -> str:
    """report.md: base vs fine-tuned per set and per source, with CIs, parse failures (or
    acc_norm when scored by likelihood), skipped bad rows and loss."""
    models = _models(metrics)
    lines = _header_lines(metrics, models) + _per_set_lines(metrics, models)
    lines += _per_source_lines(metrics, models) + _bad_row_lines(metrics) + _loss_lines(metrics, models)
    if plots:
        lines += ["", "## Plots", ""]
        for name in plots:
            lines.append(f"![{name}]({name})")
    lines += ["", f"Evaluation took {metrics.get('eval_seconds', 0):.0f} s. "
              "Per-question outputs are in predictions.jsonl.", ""]
    return "\n".join(lines)


def plot_loss_curves(train_rows: list[dict[str, Any]], path: str) -> bool:
    """Train loss and eval loss against the optimizer step; False when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in train_rows if _num(r.get("loss")) and r.get("step") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in train_rows
             if _num(r.get("eval_loss")) and r.get("step") is not None]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_accuracy(metrics: dict[str, Any], path: str) -> bool:
    """Grouped bars per eval set (base vs fine-tuned) with 95% Wilson error bars."""
    sets = metrics.get("sets") or {}
    models = _models(metrics)
    if not sets or not models:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sets)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4.2), dpi=110)
    colors = {"base": "tab:gray", "finetuned": "tab:green"}
    for k, model in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for i, name in enumerate(names):
            s = sets[name].get(model)
            if not s:
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(100 * s["accuracy"])
            err = error_bar_pct(s)
            lo.append(err[0])
            hi.append(err[1])
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=4, label=model, color=colors.get(model))
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.0f}%", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    finish_accuracy_plot(fig, ax, names, "Accuracy: base vs fine-tuned", path)
    plt.close(fig)
    return True


def error_bar_pct(row: dict[str, Any]) -> tuple[float, float]:
    """(below, above) the accuracy in percent points, from its 95% interval. max(0, ...): at 0%
    or 100% the interval's end equals the estimate up to rounding (1 - 0.9999999999999999), and
    matplotlib rejects a negative error bar."""
    return (max(0.0, 100 * (row["accuracy"] - row["ci95_low"])),
            max(0.0, 100 * (row["ci95_high"] - row["accuracy"])))


def finish_accuracy_plot(fig: Any, ax: Any, set_names: list[str], title: str, path: str,
                         legend_size: float | None = None) -> None:
    """Axes, labels and grid of an accuracy-per-set bar chart, then save it to ``path``."""
    ax.set_xticks(range(len(set_names)))
    ax.set_xticklabels(set_names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def write_outputs(
    out_dir: str,
    predictions: list[dict[str, Any]],
    metrics: dict[str, Any],
    train_rows: list[dict[str, Any]],
) -> list[str]:
    """Write every evaluate output into ``out_dir``; returns the file names written."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as fh:
        for row in predictions:
            fh.write(jsonio.dumps_line(row) + "\n")
    plots = []
    if plot_loss_curves(train_rows, os.path.join(out_dir, "loss_curves.png")):
        plots.append("loss_curves.png")
    if plot_accuracy(metrics, os.path.join(out_dir, "accuracy.png")):
        plots.append("accuracy.png")
    metrics = dict(metrics, plots=plots)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        jsonio.dump(metrics, fh)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(render_report(metrics, plots))
    return ["predictions.jsonl", "metrics.json", "report.md", *plots]
