"""`medreason prepare`: stage the base model, then turn MedReason records into tokenized splits."""

from __future__ import annotations

import logging
import time

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, lease_option, make_context
from jobs.stage import Built, Stage, run_stage

log = logging.getLogger("medreason.prepare")
STAGE = "prepare"


@click.command(
    "prepare",
    help=f"""Stage the base model and prepare the data of a run.

\b
Steps: stage the base model into <store>/cache/models/ (once, reused by every run)
-> load data.source -> validate (rejects.jsonl) -> recover answer letters -> take
data.limit records -> split train/eval by a stable hash -> drop training questions that
appear in the benchmarks (data.decontaminate + eval.benchmarks) -> format with
data.template -> tokenize -> write runs/<run>/prepare/ and commit it. Every eval.benchmarks
file is checked as evaluate reads it: a row whose gold letter is not among its options
stops prepare (exit 2, naming the file and row).
\b
Outputs: train.jsonl, eval.jsonl, train.tokens.safetensors, eval.tokens.safetensors,
rejects.jsonl, stats.json, MANIFEST.json. Running it again with the same config does
nothing; a different config needs --force (or a new --run). Two jobs staging the same
model: the second waits for the first's lease and reuses its result.
{COMMON_HELP}""",
)
@common_options
@lease_option
@exit_codes
def prepare(preset: str | None, config_file: str | None, overrides: tuple[str, ...], store: str,
            run_id: str | None, force: bool, verbose: bool) -> None:
    from medreason import staging
    from medreason.loading import load_tokenizer
    from medreason.prepare import build_prepare
    from medreason.store import manifest_hash

    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    cfg, st = ctx.config, ctx.store
    started = time.monotonic()
    # The base model first, staged once into the store's cache: its manifest is prepare's input.
    model_manifest = staging.stage_model(st, cfg.model)
    stage_model_s = time.monotonic() - started

    def build(folder: str) -> Built:
        model_dir = staging.local_model_dir(st, cfg.model)
        tokenizer = load_tokenizer(model_dir, cfg.model)
        result = build_prepare(cfg, folder, tokenizer=tokenizer, tokenizer_dir=model_dir, store=st)
        return Built(result.metrics, {"stage_model": stage_model_s, **result.timings_s},
                     {**result.extra, "model_staged_at": staging.staged_model_rel(cfg.model, st)})

    def describe(manifest: dict) -> str:
        m = manifest.get("metrics", {})
        return f"{m.get('n_train')} train / {m.get('n_eval')} eval records"

    done = run_stage(ctx, Stage(STAGE, {"model": manifest_hash(model_manifest)}), build, describe=describe)
    if not done.skipped:
        m = done.manifest["metrics"]
        log.info("prepare of run %s committed at %s: %d train / %d eval records, %d rejected, "
                 "%d decontaminated, train tokens p50 %s max %s", ctx.run_id, st.display(done.rel),
                 m["n_train"], m["n_eval"], m["n_rejected"], m["n_decontaminated"],
                 m.get("train_tokens_p50"), m.get("train_tokens_max"))


if __name__ == "__main__":
    prepare()
