"""The evaluate stage: what is scored, with which model(s), sharded over processes, written out.

What is scored: the held-out split from prepare (``eval.jsonl``) and any ``eval.benchmarks``
files (see medreason.benchmarks), with the prompt template the run was trained with. Which
model: the base alone, base + the run's adapter (final, best or a step checkpoint) or the merged
model, loaded by medreason.loading.load_for_inference; with ``eval.compare_base`` the base is
scored too, side by side (for an adapter run the same weights with the adapter switched off, so
the base costs no second load).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from medreason.benchmarks import jsonl_objects
from medreason.errors import InputError
from medreason.evaluation.generation import build_prompt, encode_prompt, generate_texts
from medreason.evaluation.loss import finish_loss, heldout_loss
from medreason.evaluation.scoring import headline, score, summarize
from medreason.loading import InferenceModel, fuse_activations, load_for_inference, require_stage

log = logging.getLogger(__name__)

HELDOUT = "heldout"


def heldout_records(lines: list[str], where: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Scorable records of prepare's eval.jsonl (those with options and a gold letter)."""
    records, skipped = [], 0
    for lineno, rec in jsonl_objects(lines, where):
        options = rec.get("options_map") or {}
        gold = rec.get("answer_letter") or ""
        if not options or not gold:
            skipped += 1  # open questions, or an answer prepare could not map to a letter
            continue
        if gold not in options:
            raise InputError(
                f"{where} line {lineno} ({rec.get('uid')}): gold letter {gold!r} is not one of the "
                f"options {', '.join(options)}; re-run `medreason prepare --force`"
            )
        records.append(rec)
        if limit and len(records) >= limit:
            break
    if skipped:
        log.info("%s: %d records without options or gold letter are not scored", where, skipped)
    return records


@dataclass
class Dist:
    """Process layout under ``accelerate launch`` (one process when run plainly)."""

    state: Any = None
    index: int = 0
    count: int = 1
    device: Any = None

    @classmethod
    def create(cls) -> Dist:
        from accelerate import PartialState

        state = PartialState()
        return cls(state=state, index=state.process_index, count=state.num_processes, device=state.device)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @contextmanager
    def shard(self, items: list[Any]) -> Iterator[list[Any]]:
        if self.count == 1 or self.state is None:
            yield items
            return
        with self.state.split_between_processes(items) as mine:
            yield list(mine)

    def gather(self, items: list[Any]) -> list[Any]:
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return list(gather_object(items))


# A named evaluation is a folder under runs/<run>/evaluate/, next to the default evaluation's
# files: no dot, so a name never collides with one of those files (report.md, metrics.json).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def evaluation_name(name: str | None) -> str | None:
    """A valid evaluation name (letters, digits, '-' and '_', at most 64) or None; else InputError."""
    if name is None:
        return None
    if not _NAME.fullmatch(name):
        raise InputError(f"evaluation name {name!r}: use 1-64 letters, digits, '-' or '_', starting with "
                         "a letter or digit (e.g. --name medqa-loglik)")
    return name


# -- the evaluate stage ------------------------------------------------------------------------------------
def stage_inputs(store: Any, run_id: str, which: str) -> dict[str, str]:
    """{input stage: manifest hash} of an evaluation; InputError when a needed stage is missing."""
    from medreason.store import manifest_hash

    inputs = {"prepare": manifest_hash(require_stage(store, run_id, "prepare", "run `medreason prepare` first"))}
    if which != "none":
        inputs["train"] = manifest_hash(require_stage(
            store, run_id, "train", "no committed adapter; run `medreason train` first, or evaluate "
            "the base alone with --set eval.checkpoint=none"))
    if which == "merged":
        inputs["merge"] = manifest_hash(require_stage(store, run_id, "merge", "run `medreason merge` first"))
    return inputs


def scored_sets(prep_dir: str, ecfg: Any,
                bad_rows: dict[str, dict[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """{set name: records}: the held-out split (eval.heldout) and eval.benchmarks. A benchmark
    with ``bad_rows: skip`` records what it left out in ``bad_rows`` ({set: summary})."""
    sets: dict[str, list[dict[str, Any]]] = {}
    if ecfg.heldout:
        path = os.path.join(prep_dir, "eval.jsonl")
        with open(path, encoding="utf-8") as fh:
            sets[HELDOUT] = heldout_records(fh.read().splitlines(), "prepare/eval.jsonl", ecfg.heldout_limit)
        if not sets[HELDOUT]:
            log.warning("the held-out split has no scorable multiple-choice records")
    if ecfg.benchmarks:
        from medreason.benchmarks import read_benchmark

        for bench in ecfg.benchmarks:
            loaded = read_benchmark(bench)
            sets[bench.name] = loaded.records
            if bench.bad_rows == "skip" and bad_rows is not None:
                bad_rows[bench.name] = loaded.skipped_summary()
    if not any(sets.values()):
        raise InputError("nothing to evaluate: eval.heldout is off (or empty) and eval.benchmarks is empty")
    return sets


def _loss_split(prep_dir: str, ecfg: Any, sets: dict[str, list[dict[str, Any]]]) -> tuple[Any, list[int]]:
    """(prepare's eval token split or None, the indices the held-out loss covers)."""
    from medreason.tokens import load_split

    path = os.path.join(prep_dir, "eval.tokens.safetensors")
    if not ecfg.heldout or not os.path.exists(path):
        return None, []
    split = load_split(path)
    # With eval.heldout_limit the loss covers the same records as the accuracy does.
    scored = {r["uid"] for r in sets.get(HELDOUT, [])} if ecfg.heldout_limit else None
    return split, [i for i, uid in enumerate(split.uids) if scored is None or uid in scored]


def _prompts_and_ids(tokenizer: Any, sets: dict[str, list[dict[str, Any]]], template: str,
                     mine: list[tuple[str, int]]) -> tuple[dict[tuple[str, int], str], list[list[int]]]:
    """The generation prompt of each of this process's questions, and its token ids."""
    prompts = {(n, i): build_prompt(sets[n][i], template, tokenizer) for n, i in mine}
    return prompts, [encode_prompt(tokenizer, prompts[k], template) for k in mine]


@dataclass
class _Ahead:
    """Prompts encoded in a background thread while the model loads, with the tokenizer used."""

    tokenizer: Any
    mine: list[tuple[str, int]]  # the questions encoded
    future: Any  # concurrent.futures.Future of _prompts_and_ids' result

    @classmethod
    def start(cls, tokenizer: Any, sets: dict[str, list[dict[str, Any]]], template: str,
              mine: list[tuple[str, int]]) -> _Ahead:
        from medreason.background import in_background

        return cls(tokenizer, list(mine), in_background("prompt-encode", _prompts_and_ids, tokenizer, sets, template, mine))


def _generate_rows(mut: InferenceModel, sets: dict[str, list[dict[str, Any]]], template: str, ecfg: Any,
                   mine: list[tuple[str, int]], ahead: list[Any]) -> list[dict[str, Any]]:
    """Prediction rows of this process's questions, answered by greedy generation; the prompts
    encoded while the model loaded when one of ``ahead`` used this tokenizer."""
    started = next((a for a in ahead if isinstance(a, _Ahead) and a.tokenizer is mut.tokenizer and a.mine == mine),
                   None)
    if started is not None:
        waiting = time.monotonic()
        prompts, ids = started.future.result()
        log.info("generation prompts: %d encoded ahead (waited %.1f s for them)", len(ids), time.monotonic() - waiting)
    else:
        prompts, ids = _prompts_and_ids(mut.tokenizer, sets, template, mine)
    texts = generate_texts(
        mut.model, mut.tokenizer, ids, ecfg.max_new_tokens, ecfg.batch_size,
        desc=f"generate ({mut.label})", max_batch_tokens=ecfg.max_batch_tokens,
        cache_bucket_tokens=ecfg.cache_bucket_tokens, compile_mode=ecfg.compile,
        decode_attention=ecfg.decode_attention,
    )
    return [score(sets[n][i], t, mut.label, n, prompts[(n, i)]) for (n, i), t in zip(mine, texts, strict=True)]


def _loglik_rows(mut: InferenceModel, sets: dict[str, list[dict[str, Any]]], ecfg: Any,
                 mine: list[tuple[str, int]], ahead: list[Any]) -> list[dict[str, Any]]:
    """Prediction rows of this process's questions, picked by option log-likelihood; with the
    requests' encoding started while the model loaded when one of ``ahead`` matches."""
    from medreason.loglik import PendingEncoding, loglik_rows

    encoding = next((e for e in ahead if isinstance(e, PendingEncoding) and e.tokenizer is mut.tokenizer), None)
    return loglik_rows(mut.model, mut.tokenizer, [(n, sets[n][i]) for n, i in mine], mut.label,
                       choices=ecfg.choices, batch_size=ecfg.batch_size,
                       shared_context=ecfg.loglik_shared_context, max_batch_tokens=ecfg.max_batch_tokens,
                       encoding=encoding)


def _items(sets: dict[str, list[dict[str, Any]]]) -> list[tuple[str, int]]:
    return [(name, i) for name, records in sets.items() for i in range(len(records))]


def _encode_ahead(sets: dict[str, list[dict[str, Any]]], template: str, ecfg: Any, dist: Dist,
                  ahead: list[Any]) -> Any:
    """The tokenizer hook of the stage: as soon as a tokenizer is loaded, it starts encoding
    this process's likelihood requests (``PendingEncoding``) or generation prompts (``_Ahead``)
    in a background thread, appended to ``ahead``, so the encoding runs while the model loads."""
    from medreason.loglik import PendingEncoding, choice_requests, loglik_questions

    def hook(tokenizer: Any) -> None:
        with dist.shard(_items(sets)) as mine:
            mine = list(mine)
        if ecfg.scoring == "loglikelihood":
            items = [(n, sets[n][i]) for n, i in mine]
            ahead.append(PendingEncoding(tokenizer, choice_requests(loglik_questions(items, ecfg.choices))))
        else:
            ahead.append(_Ahead.start(tokenizer, sets, template, mine))

    return hook


def _score_model(mut: InferenceModel, sets: dict[str, list[dict[str, Any]]], template: str, ecfg: Any,
                 dist: Dist, ahead: list[Any]) -> list[dict[str, Any]]:
    """Prediction rows of one model over every set, gathered from all processes, in set order."""
    items = _items(sets)
    with dist.shard(items) as mine:
        if ecfg.scoring == "loglikelihood":
            local = _loglik_rows(mut, sets, ecfg, mine, ahead)
        else:
            local = _generate_rows(mut, sets, template, ecfg, mine, ahead)
    gathered = dist.gather(local)
    order = {(n, sets[n][i]["uid"]): k for k, (n, i) in enumerate(items)}
    gathered.sort(key=lambda r: order.get((r["set"], r["id"]), 0))
    return gathered


def _process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included): Linux's
    start time of the process (/proc/self/stat field 22, clock ticks since boot) against the
    boot-time clock; NaN where there is no /proc."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 counts from the pid; 2 fields precede the split
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


def _warm_decode_kernels(store: Any, cfg: Any, dist: Dist) -> Any:
    """Start medreason/evaluation/warmup.py's helper process where the job will decode with the
    Triton kernels (a GPU, generation, the default decode); None elsewhere. One per machine."""
    ecfg = cfg.eval
    device = dist.device
    if (getattr(device, "type", "cpu") != "cuda" or ecfg.scoring == "loglikelihood" or ecfg.compile != "graphs"
            or ecfg.decode_attention != "triton" or cfg.model.quantization != "none"
            or getattr(dist.state, "local_process_index", 0) != 0):
        return None
    from medreason.evaluation.decode_attention import kernel_usable
    from medreason.evaluation.warmup import start
    from medreason.loading import resolve_dtype
    from medreason.staging import local_model_dir

    if kernel_usable(device) is not None:
        return None
    return start(local_model_dir(store, cfg.model), resolve_dtype(cfg.model.dtype, "cuda"))


def _stop(helper: Any) -> None:
    """End the warm-up helper if it has not ended (stuck, or not needed any more)."""
    if helper is None:
        return
    if helper.poll() is None:
        helper.kill()
    status = helper.wait()
    if status:
        log.info("decode kernel warm-up helper ended with status %s (the job compiled what it needed itself)", status)


def evaluate_run(store: Any, run_id: str, cfg: Any, out_dir: str, dist: Dist | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Score the run's model(s); write predictions.jsonl, metrics.json, report.md and plots.

    ``name``: the evaluation's name (None: the run's default evaluation), recorded in
    metrics.json. Returns {"metrics": ..., "headline": {...}}. Only the main process writes files.
    """
    dist = dist or Dist.create()
    started = time.monotonic()
    ecfg = cfg.eval
    which = ecfg.checkpoint
    require_stage(store, run_id, "prepare", "run `medreason prepare` first")
    prep_dir = store.materialize(store.stage_rel(run_id, "prepare"))
    bad_rows: dict[str, dict[str, Any]] = {}
    sets = scored_sets(prep_dir, ecfg, bad_rows)
    loading = time.monotonic()
    log.info("start-up: prepare output and %d question(s) read in %.1f s (%.1f s since the process started)",
             sum(len(r) for r in sets.values()), loading - started, _process_seconds())
    ahead: list[Any] = []
    helper = _warm_decode_kernels(store, cfg, dist)
    models = load_for_inference(store, run_id, which, cfg, dist.device, compare_base=ecfg.compare_base,
                                on_tokenizer=_encode_ahead(sets, cfg.data.template, ecfg, dist, ahead))
    if ecfg.fused_activation:
        for model in {id(m.model): m.model for m in models}.values():
            fuse_activations(model)
    log.info("start-up: %s loaded in %.1f s (%.1f s since the process started)", " and ".join(m.label for m in models),
             time.monotonic() - loading, _process_seconds())
    split, loss_indices = _loss_split(prep_dir, ecfg, sets)
    predictions: list[dict[str, Any]] = []
    losses: dict[str, dict[str, float]] = {}
    for mut in models:
        with mut.context():
            predictions.extend(_score_model(mut, sets, cfg.data.template, ecfg, dist, ahead))
            if split is not None and loss_indices:
                with dist.shard(loss_indices) as mine_idx:
                    part = heldout_loss(mut.model, split, max(1, min(ecfg.batch_size, 4)), list(mine_idx))
                losses[mut.label] = finish_loss(dist.gather([part]))
    _stop(helper)
    metrics = {
        "run_id": run_id,
        "evaluation": name,
        "checkpoint": which,
        "scoring": ecfg.scoring,
        "choices": ecfg.choices if ecfg.scoring == "loglikelihood" else None,
        "models": [m.label for m in models],
        "model_info": {m.label: m.info for m in models},
        "template": cfg.data.template,
        "max_new_tokens": ecfg.max_new_tokens,
        "sets": summarize(predictions),
        "heldout_loss": losses,
        "bad_rows": bad_rows,
        "eval_seconds": round(time.monotonic() - started, 1),
    }
    metrics["headline"] = headline(metrics)
    if dist.is_main:
        from medreason.report import write_outputs

        train_metrics_rows = read_train_metrics(store, run_id) if which != "none" else []
        write_outputs(out_dir, predictions, metrics, train_metrics_rows)
    return {"metrics": metrics, "headline": metrics["headline"]}


def read_train_metrics(store: Any, run_id: str) -> list[dict[str, Any]]:
    rel = f"{store.stage_rel(run_id, 'train')}/metrics.jsonl"
    if not store.exists(rel):
        return []
    rows = []
    for line in store.read_text(rel).splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
