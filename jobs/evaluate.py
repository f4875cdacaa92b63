"""medreason evaluate: score the base and the fine-tuned model; write a report."""

from __future__ import annotations

import logging
import time

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, lease_option, make_context
from jobs.stage import Built, Stage, adopt_train_config, dist_share, run_stage

log = logging.getLogger("medreason.evaluate")


@click.command(help=f"""Score the model on held-out and benchmark questions; write a report.

\b
Which model: eval.checkpoint = final (default) | best | step-<N> | merged | none (base
alone); with eval.compare_base the base is scored too, side by side. What: prepare's
held-out split (eval.heldout) and eval.benchmarks files. How: eval.scoring = generate
(reasoning, then the answer letter) | loglikelihood (the likeliest option, acc and
acc_norm as lm-evaluation-harness reports them). Writes runs/<run>/evaluate/ (with --name,
runs/<run>/evaluate/<NAME>/: a separate evaluation with its own config, so several of one
run coexist): predictions.jsonl, metrics.json, report.md, loss_curves.png, accuracy.png.
Under `accelerate launch` the questions are sharded over the processes.
model, data, lora and train come from the committed train stage (when there is one); a
--preset/--config/--set value that contradicts them exits 2 naming both values.
{COMMON_HELP}""")
@common_options
@lease_option
@click.option("--name", default=None, metavar="NAME",
              help="A named evaluation: runs/<run>/evaluate/NAME/ (letters, digits, '-', '_').")
@exit_codes
def evaluate(preset, config_file, overrides, store, run_id, force, verbose, name) -> None:
    from medreason.evaluation.stage import Dist, evaluate_run, evaluation_name, stage_inputs

    name = evaluation_name(name)
    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    train_manifest = ctx.store.read_manifest(ctx.store.stage_rel(run_id, "train"))
    if train_manifest is not None:
        adopt_train_config(ctx, train_manifest, "evaluate")
    cfg, st, run = ctx.config, ctx.store, ctx.run_id
    started = time.monotonic()
    stage = Stage("evaluate", stage_inputs(st, run, cfg.eval.checkpoint), suffix=name)
    dist = Dist.create()

    def build(out: str) -> Built:
        result = evaluate_run(st, run, cfg, out, dist, name=name)
        return Built(result["headline"], {"evaluate": time.monotonic() - started},
                     {"name": name} if name else {})

    def describe(_manifest: dict) -> str:
        return f"report: {st.display(stage.rel(st, run))}/report.md"

    # Only the main process commits; every process builds (the questions are sharded).
    # The default evaluation's folder holds the named ones (runs/<run>/evaluate/<NAME>/): its
    # commit replaces its own files and keeps theirs (clear=False).
    done = run_stage(ctx, stage, build, describe=describe, writer=dist.is_main,
                     share=dist_share(dist), clear=name is not None)
    if not done.skipped and done.manifest:
        from medreason.tracking import log_evaluation

        log_evaluation(cfg, st, run, done.manifest["metrics"], name=name)  # to the training's tracker runs
        for key, value in sorted(done.manifest["metrics"].items()):
            if "_accuracy_" in key:
                log.info("%s = %.3f", key, value)
        log.info("report: %s/report.md", st.display(done.rel))
    if dist.count > 1:
        dist.state.wait_for_everyone()


if __name__ == "__main__":
    evaluate()
